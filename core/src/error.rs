//! `AmqpError`: every failure a peer can cause, carrying its reply code and text. This is the one
//! place errors become `channel.close` or `connection.close`: a hard code closes the connection,
//! any other closes the channel.

use warren_protocol::{
    protocol::{channel, connection, AMQPClass},
    reply, ShortString,
};

/// An AMQP exception: reply code, RabbitMQ-style text (without the `NAME - ` prefix) and the
/// method that caused it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} - {text}", reply::name(*code))]
pub struct AmqpError {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

pub type AmqpResult<T> = Result<T, AmqpError>;

impl AmqpError {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        AmqpError {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Sets the causing method unless one is set already.
    pub fn at(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 && self.method_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    /// Hard errors close the connection; soft ones only the channel.
    pub fn is_connection_error(&self) -> bool {
        reply::is_hard(self.code)
    }

    /// `NOT_FOUND - no queue 'q' in vhost '/'`, cut to fit a short string.
    pub fn reply_text(&self) -> ShortString {
        warren_protocol::short::truncated(format!("{} - {}", reply::name(self.code), self.text))
    }

    /// The close method this error sends.
    pub fn close_method(&self) -> AMQPClass {
        if self.is_connection_error() {
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: self.code,
                reply_text: self.reply_text(),
                class_id: self.class_id,
                method_id: self.method_id,
            }))
        } else {
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: self.code,
                reply_text: self.reply_text(),
                class_id: self.class_id,
                method_id: self.method_id,
            }))
        }
    }

    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(reply::NOT_FOUND, text)
    }
    pub fn no_queue(name: &str, vhost: &str) -> Self {
        Self::not_found(format!("no queue '{name}' in vhost '{vhost}'"))
    }
    pub fn no_exchange(name: &str, vhost: &str) -> Self {
        Self::not_found(format!("no exchange '{name}' in vhost '{vhost}'"))
    }
    /// 405 for an exclusive queue of another connection, or an exclusive-flag mismatch.
    pub fn locked_queue(name: &str, vhost: &str) -> Self {
        Self::resource_locked(format!(
            "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
        ))
    }
    pub fn precondition(text: impl Into<String>) -> Self {
        Self::new(reply::PRECONDITION_FAILED, text)
    }
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(reply::ACCESS_REFUSED, text)
    }
    pub fn resource_locked(text: impl Into<String>) -> Self {
        Self::new(reply::RESOURCE_LOCKED, text)
    }
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(reply::NOT_ALLOWED, text)
    }
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(reply::NOT_IMPLEMENTED, text)
    }
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(reply::COMMAND_INVALID, text)
    }
    pub fn channel_error(text: impl Into<String>) -> Self {
        Self::new(reply::CHANNEL_ERROR, text)
    }
    pub fn unexpected_frame(text: impl Into<String>) -> Self {
        Self::new(reply::UNEXPECTED_FRAME, text)
    }
    pub fn frame_error(text: impl Into<String>) -> Self {
        Self::new(reply::FRAME_ERROR, text)
    }
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(reply::INTERNAL_ERROR, text)
    }
}

impl From<warren_protocol::codec::DecodeError> for AmqpError {
    fn from(e: warren_protocol::codec::DecodeError) -> Self {
        let (c, m) = e.method_ids();
        AmqpError::new(e.code(), e.to_string()).at(c, m)
    }
}

impl From<warren_protocol::content::ContentError> for AmqpError {
    fn from(e: warren_protocol::content::ContentError) -> Self {
        AmqpError::new(e.code(), e.to_string())
    }
}

impl From<warren_storage::StoreError> for AmqpError {
    fn from(e: warren_storage::StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        AmqpError::internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_to_close_kind() {
        let e = AmqpError::no_queue("q", "/").at(50, 10);
        assert_eq!(
            e.reply_text().as_str(),
            "NOT_FOUND - no queue 'q' in vhost '/'"
        );
        assert!(matches!(e.close_method(), AMQPClass::Channel(_)));
        let e = AmqpError::not_allowed("vhost x not found");
        assert!(matches!(e.close_method(), AMQPClass::Connection(_)));
        let long = AmqpError::precondition("é".repeat(300));
        assert!(long.reply_text().as_str().len() <= 255);
    }
}
