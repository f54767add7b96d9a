//! Every wire shape amoCRM sends (SPEC §4, §7), read by a real PHP receiver: PHP's built-in
//! server runs `tests/php/receiver.php`, which saves `json_encode($_POST)`, and each is compared,
//! key order included, with the structure amoCRM's docs show (form values read back as strings).

mod common;
mod php;

use common::TestServer;
use php::PhpReceiver;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn default_account() -> Value {
    json!({"subdomain": "test", "id": "7039099", "_links": {"self": "https://test.amocrm.ru"}})
}

/// Emits `event` and returns what the PHP receiver read through `$_POST` for its delivery to
/// `sub`.
async fn received(server: &TestServer, php: &PhpReceiver, sub: &str, event: Value) -> Value {
    let receipt = server.emit(event.clone()).await;
    assert_eq!(receipt["deliveries"], 1, "{event}");
    let (code, list) = server
        .get(&format!("/v1/deliveries?subscription={sub}&limit=1000"))
        .await;
    assert_eq!(code, 200, "{list}");
    let delivery = list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["event_id"] == receipt["id"])
        .unwrap_or_else(|| panic!("no delivery for {event}"))
        .clone();
    php.post_of(delivery["id"].as_str().unwrap(), WAIT).await
}

/// Compares as pretty JSON text, so key order counts too.
fn assert_same(case: &str, got: &Value, want: &Value) {
    assert_eq!(
        serde_json::to_string_pretty(got).unwrap(),
        serde_json::to_string_pretty(want).unwrap(),
        "{case}: $_POST differs"
    );
}

async fn setup() -> (TestServer, PhpReceiver, String) {
    let server = TestServer::start("").await;
    let php = PhpReceiver::start().await;
    let all: Vec<&str> = CATALOGUE.iter().map(|(name, _, _, _)| *name).collect();
    let sub = server
        .subscribe(json!({"url": php.url("/amocrm/webhook"), "events": all}))
        .await;
    (server, php, sub["id"].as_str().unwrap().to_string())
}

/// Every event of SPEC §4: name, payload key, action, and the `type` amoCRM adds.
const CATALOGUE: [(&str, &str, &str, Option<&str>); 40] = [
    ("add_lead", "leads", "add", None),
    ("update_lead", "leads", "update", None),
    ("delete_lead", "leads", "delete", None),
    ("restore_lead", "leads", "restore", None),
    ("status_lead", "leads", "status", None),
    ("responsible_lead", "leads", "responsible", None),
    ("note_lead", "leads", "note", None),
    ("mail_in_lead", "leads", "mail_in", None),
    ("call_in_lead", "leads", "call_in", None),
    ("chat_lead", "leads", "chat", None),
    ("site_visit_lead", "leads", "site_visit", None),
    ("add_contact", "contacts", "add", Some("contact")),
    ("update_contact", "contacts", "update", Some("contact")),
    ("delete_contact", "contacts", "delete", Some("contact")),
    ("restore_contact", "contacts", "restore", Some("contact")),
    (
        "responsible_contact",
        "contacts",
        "responsible",
        Some("contact"),
    ),
    ("note_contact", "contacts", "note", Some("contact")),
    ("add_company", "contacts", "add", Some("company")),
    ("update_company", "contacts", "update", Some("company")),
    ("delete_company", "contacts", "delete", Some("company")),
    ("restore_company", "contacts", "restore", Some("company")),
    (
        "responsible_company",
        "contacts",
        "responsible",
        Some("company"),
    ),
    ("note_company", "contacts", "note", Some("company")),
    ("add_customer", "customers", "add", None),
    ("update_customer", "customers", "update", None),
    ("delete_customer", "customers", "delete", None),
    ("responsible_customer", "customers", "responsible", None),
    ("note_customer", "customers", "note", None),
    ("period_customer", "customers", "period", None),
    ("mail_in_customer", "customers", "mail_in", None),
    ("call_in_customer", "customers", "call_in", None),
    ("chat_customer", "customers", "chat", None),
    ("site_visit_customer", "customers", "site_visit", None),
    ("add_task", "task", "add", None),
    ("update_task", "task", "update", None),
    ("delete_task", "task", "delete", None),
    ("responsible_task", "task", "responsible", None),
    ("add_talk", "talk", "add", None),
    ("update_talk", "talk", "update", None),
    ("add_message", "message", "add", None),
];

#[tokio::test]
async fn every_event_of_the_catalogue_reads_back_under_its_key_and_action() {
    let (server, php, sub) = setup().await;
    for (i, (name, key, action, kind)) in CATALOGUE.iter().enumerate() {
        let id = 1000 + i;
        let got = received(
            &server,
            &php,
            &sub,
            json!({"event": name, "data": {"id": id, "name": "Имя с пробелами", "responsible_user_id": 504141}}),
        )
        .await;
        let mut item = json!({"id": id.to_string(), "name": "Имя с пробелами", "responsible_user_id": "504141"});
        if let Some(kind) = kind {
            item["type"] = json!(kind);
        }
        let want = json!({ *key: { *action: [item] }, "account": default_account() });
        assert_same(name, &got, &want);
    }
}

#[tokio::test]
async fn leads_with_custom_fields_tags_and_text_read_back_as_amocrm_documents_them() {
    let (server, php, sub) = setup().await;

    // add_lead with every custom-field value shape, tags, Cyrillic, spaces, reserved characters,
    // numbers, booleans, and nulls and empty lists that PHP never sees.
    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "add_lead", "data": {
            "id": 25399013,
            "name": "Сделка с ООО «Ромашка» & co = 100% + [скидка]",
            "status_id": 142,
            "price": 1500.5,
            "responsible_user_id": "504141",
            "last_modified": 1413554372,
            "modified_user_id": "504141",
            "created_user_id": "504141",
            "date_create": "1413554372",
            "pipeline_id": "752662",
            "account_id": "7039099",
            "is_deleted": false,
            "closest_task_at": null,
            "tags": [{"id": "10", "name": "горячий клиент"}, {"id": 11, "name": "vip"}],
            "custom_fields": [
                {"id": "427493", "name": "Источник", "values": [{"value": "Сайт", "enum": "1034741"}]},
                {"id": "427495", "name": "Комментарий", "values": [{"value": "Перезвонить после 18:00"}]},
                {"id": "427497", "name": "Мультисписок", "values": ["Первый", "Второй вариант"]},
                {"id": "427499", "name": "Флаг", "values": [{"value": true}]},
                {"id": "427501", "name": "Пустое", "values": []},
                {"id": "427503", "name": "С пропуском", "values": [null, "второе"]},
            ],
            "linked_company_id": "",
        }}),
    )
    .await;
    assert_same(
        "add_lead",
        &got,
        &json!({
            "leads": {"add": [{
                "id": "25399013",
                "name": "Сделка с ООО «Ромашка» & co = 100% + [скидка]",
                "status_id": "142",
                "price": "1500.5",
                "responsible_user_id": "504141",
                "last_modified": "1413554372",
                "modified_user_id": "504141",
                "created_user_id": "504141",
                "date_create": "1413554372",
                "pipeline_id": "752662",
                "account_id": "7039099",
                "is_deleted": "0",
                "tags": [{"id": "10", "name": "горячий клиент"}, {"id": "11", "name": "vip"}],
                "custom_fields": [
                    {"id": "427493", "name": "Источник", "values": [{"value": "Сайт", "enum": "1034741"}]},
                    {"id": "427495", "name": "Комментарий", "values": [{"value": "Перезвонить после 18:00"}]},
                    {"id": "427497", "name": "Мультисписок", "values": ["Первый", "Второй вариант"]},
                    {"id": "427499", "name": "Флаг", "values": [{"value": "1"}]},
                    {"id": "427501", "name": "Пустое"},
                    // PHP keeps the index of the element left: an object, not a list.
                    {"id": "427503", "name": "С пропуском", "values": {"1": "второе"}},
                ],
                "linked_company_id": "",
            }]},
            "account": default_account(),
        }),
    );

    // status_lead: the captured shape of SPEC §7.
    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "status_lead", "data": {"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": "752662", "old_pipeline_id": "752662"}}),
    )
    .await;
    assert_same(
        "status_lead",
        &got,
        &json!({
            "leads": {"status": [{"id": "25399013", "status_id": "142", "old_status_id": "7039101", "pipeline_id": "752662", "old_pipeline_id": "752662"}]},
            "account": default_account(),
        }),
    );

    // delete_lead: what amoCRM sends for a deleted lead.
    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "delete_lead", "data": {"id": "25399013", "status_id": "142", "pipeline_id": "752662"}}),
    )
    .await;
    assert_same(
        "delete_lead",
        &got,
        &json!({"leads": {"delete": [{"id": "25399013", "status_id": "142", "pipeline_id": "752662"}]}, "account": default_account()}),
    );

    // responsible_lead with the previous responsible user.
    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "responsible_lead", "data": {"id": 25399013, "responsible_user_id": 504142, "old_responsible_user_id": 504141}}),
    )
    .await;
    assert_same(
        "responsible_lead",
        &got,
        &json!({"leads": {"responsible": [{"id": "25399013", "responsible_user_id": "504142", "old_responsible_user_id": "504141"}]}, "account": default_account()}),
    );

    // note_lead: the note nested under `note`.
    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "note_lead", "data": {"id": "9000", "note": {"id": "9000", "text": "Клиент просит перезвонить\nзавтра", "note_type": 4, "element_id": "25399013", "element_type": 2, "created_at": "1413554372"}}}),
    )
    .await;
    assert_same(
        "note_lead",
        &got,
        &json!({"leads": {"note": [{"id": "9000", "note": {"id": "9000", "text": "Клиент просит перезвонить\nзавтра", "note_type": "4", "element_id": "25399013", "element_type": "2", "created_at": "1413554372"}}]}, "account": default_account()}),
    );
}

#[tokio::test]
async fn contacts_and_companies_travel_under_contacts_told_apart_by_type() {
    let (server, php, sub) = setup().await;
    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "add_contact", "data": {
            "id": 31773593,
            "name": "Иван Петров",
            "responsible_user_id": "504141",
            "linked_leads_id": {"25399013": "25399013"},
            "custom_fields": [
                {"id": "66192", "name": "Телефон", "code": "PHONE", "values": [{"value": "+7 (912) 345-67-89", "enum": "193200"}, {"value": "+79120000000", "enum": "193202"}]},
                {"id": "66194", "name": "Email", "code": "EMAIL", "values": [{"value": "ivan+test@example.com", "enum": "193206"}]},
            ],
        }}),
    )
    .await;
    assert_same(
        "add_contact",
        &got,
        &json!({
            "contacts": {"add": [{
                "id": "31773593",
                "name": "Иван Петров",
                "responsible_user_id": "504141",
                "linked_leads_id": {"25399013": "25399013"},
                "custom_fields": [
                    {"id": "66192", "name": "Телефон", "code": "PHONE", "values": [{"value": "+7 (912) 345-67-89", "enum": "193200"}, {"value": "+79120000000", "enum": "193202"}]},
                    {"id": "66194", "name": "Email", "code": "EMAIL", "values": [{"value": "ivan+test@example.com", "enum": "193206"}]},
                ],
                "type": "contact",
            }]},
            "account": default_account(),
        }),
    );

    let got = received(
        &server,
        &php,
        &sub,
        json!({"event": "update_company", "data": {"id": "31773600", "name": "ООО «Ромашка»", "custom_fields": [{"id": "66196", "name": "Web", "values": ["https://romashka.example/?a=1&b=2"]}]}}),
    )
    .await;
    assert_same(
        "update_company",
        &got,
        &json!({
            "contacts": {"update": [{"id": "31773600", "name": "ООО «Ромашка»", "custom_fields": [{"id": "66196", "name": "Web", "values": ["https://romashka.example/?a=1&b=2"]}], "type": "company"}]},
            "account": default_account(),
        }),
    );

    for (name, kind) in [("delete_contact", "contact"), ("delete_company", "company")] {
        let got = received(
            &server,
            &php,
            &sub,
            json!({"event": name, "data": {"id": "31773593"}}),
        )
        .await;
        assert_same(
            name,
            &got,
            &json!({"contacts": {"delete": [{"id": "31773593", "type": kind}]}, "account": default_account()}),
        );
    }
}

#[tokio::test]
async fn customers_tasks_talks_and_messages_read_back_as_amocrm_documents_them() {
    let (server, php, sub) = setup().await;
    let cases = [
        (
            json!({"event": "add_customer", "data": {"id": 501, "name": "Постоянный клиент", "next_price": 1000, "next_date": 1700000000, "status_id": 31, "tags": [{"id": 7, "name": "опт"}]}}),
            json!({"customers": {"add": [{"id": "501", "name": "Постоянный клиент", "next_price": "1000", "next_date": "1700000000", "status_id": "31", "tags": [{"id": "7", "name": "опт"}]}]}, "account": default_account()}),
        ),
        (
            json!({"event": "add_task", "data": {"id": "8001", "element_id": "25399013", "element_type": "2", "task_type": "1", "text": "Позвонить клиенту", "status": "0", "complete_till": "1413590399", "responsible_user_id": "504141"}}),
            json!({"task": {"add": [{"id": "8001", "element_id": "25399013", "element_type": "2", "task_type": "1", "text": "Позвонить клиенту", "status": "0", "complete_till": "1413590399", "responsible_user_id": "504141"}]}, "account": default_account()}),
        ),
        (
            json!({"event": "delete_task", "data": {"id": "8001"}}),
            json!({"task": {"delete": [{"id": "8001"}]}, "account": default_account()}),
        ),
        (
            json!({"event": "add_talk", "data": {"id": "77", "talk_id": "77", "contact_id": "31773593", "chat_id": "b2c6a3c4-5c5e-4f1d-9c1d-6e5d1f0f9a11", "entity_id": "25399013", "entity_type": "lead", "origin": "telegram", "is_in_work": true, "is_read": false, "created_at": 1700000000}}),
            json!({"talk": {"add": [{"id": "77", "talk_id": "77", "contact_id": "31773593", "chat_id": "b2c6a3c4-5c5e-4f1d-9c1d-6e5d1f0f9a11", "entity_id": "25399013", "entity_type": "lead", "origin": "telegram", "is_in_work": "1", "is_read": "0", "created_at": "1700000000"}]}, "account": default_account()}),
        ),
        (
            json!({"event": "add_message", "data": {"id": "m-1", "chat_id": "c-1", "talk_id": "77", "contact_id": "31773593", "text": "Здравствуйте! Сколько стоит доставка?", "created_at": 1700000001, "element_type": "2", "entity_type": "lead", "element_id": "25399013", "entity_id": "25399013", "type": "incoming", "author": {"id": "a-1", "type": "external", "name": "Иван"}, "attachment": {"type": "picture", "link": "https://files.example/p.png?x=1&y=2", "file_name": "фото 1.png"}}}),
            json!({"message": {"add": [{"id": "m-1", "chat_id": "c-1", "talk_id": "77", "contact_id": "31773593", "text": "Здравствуйте! Сколько стоит доставка?", "created_at": "1700000001", "element_type": "2", "entity_type": "lead", "element_id": "25399013", "entity_id": "25399013", "type": "incoming", "author": {"id": "a-1", "type": "external", "name": "Иван"}, "attachment": {"type": "picture", "link": "https://files.example/p.png?x=1&y=2", "file_name": "фото 1.png"}}]}, "account": default_account()}),
        ),
    ];
    for (event, want) in cases {
        let got = received(&server, &php, &sub, event.clone()).await;
        assert_same(event["event"].as_str().unwrap(), &got, &want);
    }
}

#[tokio::test]
async fn the_account_block_is_the_configured_one_unless_the_event_brings_its_own() {
    let server = TestServer::start(
        "[account]\nsubdomain = \"romashka\"\nid = 29797051\nlink = \"https://romashka.kommo.com\"\n",
    )
    .await;
    let php = PhpReceiver::start().await;
    let sub = server
        .subscribe(json!({"url": php.url("/"), "events": ["add_lead"]}))
        .await;
    let sub = sub["id"].as_str().unwrap();
    let got = received(
        &server,
        &php,
        sub,
        json!({"event": "add_lead", "data": {"id": 1}}),
    )
    .await;
    assert_same(
        "configured account",
        &got,
        &json!({"leads": {"add": [{"id": "1"}]}, "account": {"subdomain": "romashka", "id": "29797051", "_links": {"self": "https://romashka.kommo.com"}}}),
    );
    let got = received(
        &server,
        &php,
        sub,
        json!({"event": "add_lead", "data": {"id": 2}, "account": {"subdomain": "другой", "id": "42", "_links": {"self": "https://other.amocrm.ru"}}}),
    )
    .await;
    assert_same(
        "the event's account",
        &got,
        &json!({"leads": {"add": [{"id": "2"}]}, "account": {"subdomain": "другой", "id": "42", "_links": {"self": "https://other.amocrm.ru"}}}),
    );
}
