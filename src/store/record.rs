//! The binary record of a delivery (`d` keys), written with its first outcome and rewritten with
//! each later one: about a third of its JSON, and what sled copies on every write to its node.
//!
//! Layout (integers big-endian): the version byte, the status, flags (bit 0 `next_attempt_at`,
//! bit 1 `ended_at`, bit 2 `error`), `created_at`, the optional times, the ids of the delivery,
//! its event and its subscription, the event name (u16 length), the error (u32 length), then the
//! attempts (u16 count), each `n`, `started_at`, `duration_ms`, `code`, flags (bit 0 error, bit 1
//! response body) and those strings (u32 length). Records written as JSON by earlier versions
//! (they start with `{`) are still read.

use super::model::{Attempt, Delivery, DeliveryStatus};
use uuid::Uuid;

/// The first byte of a binary delivery record.
const DELIVERY_RECORD_V1: u8 = 2;

pub fn encode_delivery(d: &Delivery) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        80 + d.event.len() + d.attempts.len() * 24 + d.error.as_ref().map_or(0, String::len),
    );
    out.push(DELIVERY_RECORD_V1);
    out.push(match d.status {
        DeliveryStatus::Pending => 0,
        DeliveryStatus::Delivered => 1,
        DeliveryStatus::Failed => 2,
    });
    out.push(
        u8::from(d.next_attempt_at.is_some())
            | u8::from(d.ended_at.is_some()) << 1
            | u8::from(d.error.is_some()) << 2,
    );
    out.extend_from_slice(&d.created_at.to_be_bytes());
    for t in [d.next_attempt_at, d.ended_at].into_iter().flatten() {
        out.extend_from_slice(&t.to_be_bytes());
    }
    out.extend_from_slice(d.id.as_bytes());
    out.extend_from_slice(d.event_id.as_bytes());
    out.extend_from_slice(d.subscription_id.as_bytes());
    put_str16(&mut out, &d.event);
    if let Some(e) = &d.error {
        put_str32(&mut out, e);
    }
    out.extend_from_slice(&(d.attempts.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for a in d.attempts.iter().take(u16::MAX as usize) {
        out.extend_from_slice(&a.n.to_be_bytes());
        out.extend_from_slice(&a.started_at.to_be_bytes());
        out.extend_from_slice(&a.duration_ms.to_be_bytes());
        out.extend_from_slice(&a.code.to_be_bytes());
        out.push(u8::from(a.error.is_some()) | u8::from(a.response_body.is_some()) << 1);
        for s in [&a.error, &a.response_body].into_iter().flatten() {
            put_str32(&mut out, s);
        }
    }
    out
}

/// Reads a delivery record, binary or JSON; `Err` names what is wrong with it.
pub fn decode_delivery(v: &[u8]) -> Result<Delivery, String> {
    if v.first() == Some(&b'{') {
        return serde_json::from_slice(v).map_err(|e| e.to_string());
    }
    if v.first() != Some(&DELIVERY_RECORD_V1) {
        return Err("not a delivery record".into());
    }
    let mut r = Reader { v, at: 1 };
    let status = match r.u8()? {
        0 => DeliveryStatus::Pending,
        1 => DeliveryStatus::Delivered,
        2 => DeliveryStatus::Failed,
        s => return Err(format!("unknown status {s}")),
    };
    let flags = r.u8()?;
    let created_at = r.u64()?;
    let next_attempt_at = if flags & 1 != 0 { Some(r.u64()?) } else { None };
    let ended_at = if flags & 2 != 0 { Some(r.u64()?) } else { None };
    let id = r.uuid()?;
    let event_id = r.uuid()?;
    let subscription_id = r.uuid()?;
    let event = r.str16()?;
    let error = if flags & 4 != 0 {
        Some(r.str32()?)
    } else {
        None
    };
    let n = r.u16()? as usize;
    let mut attempts = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let n = r.u32()?;
        let started_at = r.u64()?;
        let duration_ms = r.u64()?;
        let code = r.u16()?;
        let f = r.u8()?;
        let error = if f & 1 != 0 { Some(r.str32()?) } else { None };
        let response_body = if f & 2 != 0 { Some(r.str32()?) } else { None };
        attempts.push(Attempt {
            n,
            started_at,
            duration_ms,
            code,
            error,
            response_body,
        });
    }
    if r.at != v.len() {
        return Err(format!("{} bytes past its end", v.len() - r.at));
    }
    Ok(Delivery {
        id,
        event_id,
        event,
        subscription_id,
        status,
        created_at,
        next_attempt_at,
        ended_at,
        error,
        attempts,
    })
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u32::MAX as usize)];
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

struct Reader<'a> {
    v: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.v.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let bytes = &self.v[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn uuid(&mut self) -> Result<Uuid, String> {
        Ok(Uuid::from_slice(self.take(16)?).expect("16 bytes"))
    }

    fn str16(&mut self) -> Result<String, String> {
        let n = self.u16()? as usize;
        self.string(n)
    }

    fn str32(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        self.string(n)
    }

    fn string(&mut self, n: usize) -> Result<String, String> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Delivery {
        Delivery {
            id: Uuid::now_v7(),
            event_id: Uuid::now_v7(),
            event: "status_lead".into(),
            subscription_id: Uuid::new_v4(),
            status: DeliveryStatus::Pending,
            created_at: 1_700_000_000_123,
            next_attempt_at: Some(1_700_000_300_123),
            ended_at: None,
            error: None,
            attempts: vec![Attempt {
                n: 1,
                started_at: 1_700_000_000_200,
                duration_ms: 12,
                code: 503,
                error: None,
                response_body: Some("busy — попробуйте позже".into()),
            }],
        }
    }

    #[test]
    fn a_delivery_reads_back_as_written() {
        let mut d = delivery();
        assert_eq!(decode_delivery(&encode_delivery(&d)).unwrap(), d);
        d.status = DeliveryStatus::Failed;
        d.next_attempt_at = None;
        d.ended_at = Some(1_700_000_900_000);
        d.error = Some("HTTP 500 on attempt 2; the retry policy allows no further attempt".into());
        d.attempts.push(Attempt {
            n: 2,
            started_at: 1_700_000_300_200,
            duration_ms: 2_000,
            code: 0,
            error: Some("timed out".into()),
            response_body: None,
        });
        assert_eq!(decode_delivery(&encode_delivery(&d)).unwrap(), d);
        d.status = DeliveryStatus::Delivered;
        d.attempts.clear();
        d.error = None;
        assert_eq!(decode_delivery(&encode_delivery(&d)).unwrap(), d);
    }

    #[test]
    fn the_binary_record_is_a_fraction_of_the_json() {
        let d = delivery();
        let json = serde_json::to_vec(&d).unwrap();
        let bin = encode_delivery(&d);
        assert!(
            bin.len() * 2 < json.len(),
            "{} vs {}",
            bin.len(),
            json.len()
        );
    }

    #[test]
    fn records_written_as_json_are_still_read() {
        let d = delivery();
        assert_eq!(
            decode_delivery(&serde_json::to_vec(&d).unwrap()).unwrap(),
            d
        );
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let bin = encode_delivery(&delivery());
        for cut in 0..bin.len() {
            assert!(decode_delivery(&bin[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bin.clone();
        longer.push(0);
        assert!(
            decode_delivery(&longer)
                .unwrap_err()
                .contains("past its end")
        );
        let mut status = bin;
        status[1] = 9;
        assert!(decode_delivery(&status).unwrap_err().contains("status"));
        assert!(decode_delivery(b"").is_err());
        assert!(decode_delivery(&[7, 1, 2]).is_err());
    }
}
