"""Reads webhook bodies exactly as the dispatcher sent them with aioamocrm.parse_webhook, as a
Python receiver would, and prints what it read.

stdin: a JSON list of bodies (strings). stdout: a JSON list, one object a body:
{"events": [{"entity", "action", "id", "payload", "fields"}], "account", "account_id", "subdomain"}
where "fields" maps each custom field id to field_values(id), and PHONE/EMAIL to field_value(code).
"""

import json
import sys

from aioamocrm import parse_webhook


def read(body):
    webhook = parse_webhook(body.encode("utf-8"))
    events = []
    for event in webhook.events:
        fields = {str(f["id"]): event.field_values(int(f["id"])) for f in event.custom_fields}
        for code in ("PHONE", "EMAIL"):
            value = event.field_value(code)
            if value is not None:
                fields[code] = value
        events.append(
            {
                "entity": event.entity,
                "action": event.action,
                "id": event.id,
                "payload": event.payload,
                "fields": fields,
            }
        )
    return {
        "events": events,
        "account": webhook.account,
        "account_id": webhook.account_id,
        "subdomain": webhook.subdomain,
    }


json.dump([read(body) for body in json.load(sys.stdin)], sys.stdout, ensure_ascii=False)
