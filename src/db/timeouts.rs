//! The one place a transaction's or a session's timeouts are written as SQL. Every `SET` of
//! `lock_timeout`, `statement_timeout` or `idle_in_transaction_session_timeout` the engine sends is
//! built here, so no caller can forget one of them or write a value PostgreSQL reads as "no limit".
//! Owns only the text of those settings; sending them is the caller's business.

use std::time::Duration;

/// One timeout setting: a limit, or explicitly none (`0`, overriding a role's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this long. Zero is sent as 1 ms: PostgreSQL reads 0 as "no limit".
    Within(Duration),
    /// No limit, set explicitly so that a role-level or database-level default does not apply.
    Unlimited,
}

impl Limit {
    fn sql_value(self) -> u128 {
        match self {
            Limit::Within(d) => d.as_millis().max(1),
            Limit::Unlimited => 0,
        }
    }
}

/// The timeouts of one transaction or session; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub lock: Option<Limit>,
    pub statement: Option<Limit>,
    pub idle_in_transaction: Option<Limit>,
}

impl Timeouts {
    /// The timeouts of every transaction that applies a job's statement (a chunk, a skipped key,
    /// a retried failure, the plan's probe of the first chunk): the job's lock and statement
    /// timeouts, and an idle-in-transaction limit of `lease`, so that a process hanging inside one
    /// (stopped, swapping, stuck) does not keep the rows locked after its lease has expired.
    pub fn chunk(lock: Duration, statement: Duration, lease: Duration) -> Timeouts {
        Timeouts {
            lock: Some(Limit::Within(lock)),
            statement: Some(Limit::Within(statement)),
            idle_in_transaction: Some(Limit::Within(lease)),
        }
    }

    /// `SET LOCAL …` for each setting given, `; `-separated: they end with the transaction.
    pub fn set_local(&self) -> String {
        self.set("SET LOCAL")
    }

    /// `SET …` for each setting given: they last for the session until [`Timeouts::reset`].
    pub fn set_session(&self) -> String {
        self.set("SET")
    }

    /// `RESET …` for each setting given, back to the session's defaults.
    pub fn reset(&self) -> String {
        self.settings()
            .map(|(name, _)| format!("RESET {name}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn set(&self, verb: &str) -> String {
        self.settings()
            .map(|(name, limit)| format!("{verb} {name} = {}", limit.sql_value()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn settings(&self) -> impl Iterator<Item = (&'static str, Limit)> {
        [
            ("lock_timeout", self.lock),
            ("statement_timeout", self.statement),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction,
            ),
        ]
        .into_iter()
        .filter_map(|(name, limit)| limit.map(|l| (name, l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_given_setting_is_written_once_and_zero_never_means_unlimited() {
        let t = Timeouts {
            lock: Some(Limit::Within(Duration::from_millis(1500))),
            statement: Some(Limit::Within(Duration::ZERO)),
            idle_in_transaction: None,
        };
        assert_eq!(
            t.set_local(),
            "SET LOCAL lock_timeout = 1500; SET LOCAL statement_timeout = 1"
        );
        assert_eq!(t.reset(), "RESET lock_timeout; RESET statement_timeout");
        let all = Timeouts {
            lock: Some(Limit::Unlimited),
            statement: Some(Limit::Unlimited),
            idle_in_transaction: Some(Limit::Within(Duration::from_secs(2))),
        };
        assert_eq!(
            all.set_session(),
            "SET lock_timeout = 0; SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 2000"
        );
        assert_eq!(Timeouts::default().set_local(), "");
    }
}
