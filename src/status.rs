//! The states an outbox row and a notification go through, as Rust reads them
//! back from PostgreSQL. The transitions themselves are SQL (`outbox`,
//! `notify::store`), each guarded by the state it expects; these types keep
//! the answers from being compared as strings.

use std::error::Error;
use std::fmt;

use tokio_postgres::types::{FromSql, Type};

/// A state name PostgreSQL answered that this outboxd does not know.
#[derive(Debug)]
pub struct UnknownStatus(pub String);

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown status {:?}", self.0)
    }
}

impl Error for UnknownStatus {}

macro_rules! text_states {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every state, in the order they are listed.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name the table stores.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownStatus;

            fn from_str(text: &str) -> Result<Self, UnknownStatus> {
                match text {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownStatus(other.to_owned())),
                }
            }
        }

        impl<'a> FromSql<'a> for $name {
            fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
                Ok(<&str as FromSql>::from_sql(ty, raw)?.parse()?)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

text_states! {
    /// `outbox_messages.status`.
    Status {
        /// Waiting; due when `next_attempt_at` has come.
        Pending => "pending",
        /// Claimed by a relay until its lease ends.
        Processing => "processing",
        /// In MongoDB.
        Synced => "synced",
        /// Given up, until requeued.
        Failed => "failed",
    }
}

text_states! {
    /// `outbox_notifications.status`.
    MailStatus {
        Pending => "pending",
        Processing => "processing",
        Sent => "sent",
        Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_as_itself_and_an_unknown_one_is_an_error() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), *s);
        }
        for s in MailStatus::ALL {
            assert_eq!(s.to_string().parse::<MailStatus>().unwrap(), *s);
        }
        assert!("sent".parse::<Status>().is_err());
        assert!("synced".parse::<MailStatus>().is_err());
    }
}
