//! SASL responses from connection.start-ok: PLAIN (`\0user\0pass`) and RabbitMQ's AMQPLAIN (a
//! field table without its length prefix, holding LOGIN and PASSWORD).

use amq_protocol::types::{parsing::parse_field_table, AMQPValue};

#[derive(Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("unsupported authentication mechanism '{0}'")]
    UnsupportedMechanism(String),
    #[error("malformed {0} response")]
    Malformed(&'static str),
}

/// Parses a start-ok response for `mechanism`.
pub fn parse_response(mechanism: &str, response: &[u8]) -> Result<Credentials, SaslError> {
    match mechanism {
        "PLAIN" => parse_plain(response),
        "AMQPLAIN" => parse_amqplain(response),
        other => Err(SaslError::UnsupportedMechanism(other.to_string())),
    }
}

fn parse_plain(response: &[u8]) -> Result<Credentials, SaslError> {
    // authzid \0 authcid \0 passwd; the authzid is ignored, as RabbitMQ does.
    let mut parts = response.splitn(3, |b| *b == 0);
    let _authzid = parts.next().ok_or(SaslError::Malformed("PLAIN"))?;
    let user = parts.next().ok_or(SaslError::Malformed("PLAIN"))?;
    let pass = parts.next().ok_or(SaslError::Malformed("PLAIN"))?;
    Ok(Credentials {
        username: String::from_utf8(user.to_vec()).map_err(|_| SaslError::Malformed("PLAIN"))?,
        password: String::from_utf8(pass.to_vec()).map_err(|_| SaslError::Malformed("PLAIN"))?,
    })
}

fn parse_amqplain(response: &[u8]) -> Result<Credentials, SaslError> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&(response.len() as u32).to_be_bytes());
    framed.extend_from_slice(response);
    let (_, table) =
        parse_field_table(&framed[..]).map_err(|_| SaslError::Malformed("AMQPLAIN"))?;
    let get = |k: &str| -> Option<String> {
        match table.inner().get(k)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    };
    Ok(Credentials {
        username: get("LOGIN").ok_or(SaslError::Malformed("AMQPLAIN"))?,
        password: get("PASSWORD").ok_or(SaslError::Malformed("AMQPLAIN"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{generation::gen_field_table, FieldTable, LongString};

    #[test]
    fn plain() {
        let c = parse_response("PLAIN", b"\0guest\0gu\0est").unwrap();
        assert_eq!(
            c,
            Credentials {
                username: "guest".into(),
                password: "gu\0est".into()
            }
        );
        assert!(parse_response("PLAIN", b"guest").is_err());
        assert!(matches!(
            parse_response("EXTERNAL", b""),
            Err(SaslError::UnsupportedMechanism(_))
        ));
    }

    #[test]
    fn amqplain() {
        let mut t = FieldTable::default();
        t.insert(
            "LOGIN".into(),
            AMQPValue::LongString(LongString::from("bob")),
        );
        t.insert(
            "PASSWORD".into(),
            AMQPValue::LongString(LongString::from("secret")),
        );
        let (v, _) = gen_field_table(&t)(amq_protocol::frame::WriteContext::from(Vec::new()))
            .unwrap()
            .into_inner();
        let c = parse_response("AMQPLAIN", &v[4..]).unwrap();
        assert_eq!(
            c,
            Credentials {
                username: "bob".into(),
                password: "secret".into()
            }
        );
        assert!(parse_response("AMQPLAIN", b"\x01").is_err());
    }
}
