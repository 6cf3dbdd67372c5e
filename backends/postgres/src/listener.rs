//! [`PgListener`]: wake-ups from the capture triggers' `NOTIFY`.
//!
//! A notification is only a hint: the data stays in the log tables, every trigger sends
//! the same constant payload on one channel (the schema's name), and PostgreSQL folds
//! identical notifications of one transaction into one, so there is one wake-up per
//! writing transaction at most. What is lost, and why that is fine:
//!
//! - Notifications sent while the connection is down: the host reads the log after every
//!   (re)connect.
//! - Notifications sent before the first `wait`: the connection LISTENs lazily, on the
//!   first `wait`, and that `wait` returns at once so the host reads the log again. A
//!   connection used only for `install` or `prune` therefore never listens, and never
//!   buffers notifications nobody drains.
//! - A notification lost for any other reason: `wait` never blocks longer than the
//!   fallback poll interval before reporting "maybe new changes".
//!
//! Notifications that pile up while the host works through a long backlog are dropped at
//! the start of each fetch (see [`PgListener::discard_pending`]): that fetch reads
//! everything they announced.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::error::PgError;
use crate::ident::Ident;

pub(crate) struct PgListener {
    channel: Ident,
    /// `notify` option: when off, `wait` just sleeps.
    enabled: bool,
    fallback_poll: Duration,
    /// Whether this connection has issued LISTEN.
    listening: bool,
}

impl PgListener {
    pub fn new(channel: Ident, enabled: bool, fallback_poll: Duration) -> PgListener {
        PgListener {
            channel,
            enabled,
            fallback_poll,
            listening: false,
        }
    }

    fn listen(&mut self, client: &mut Client) -> Result<(), PgError> {
        client
            .batch_execute(&format!("LISTEN {}", self.channel.quoted()))
            .map_err(PgError::sql(format!("listen on channel {}", self.channel)))?;
        self.listening = true;
        Ok(())
    }

    /// A new connection replaced the old one: listen again if we were listening.
    pub fn reconnected(&mut self, client: &mut Client) -> Result<(), PgError> {
        if self.listening {
            self.listening = false;
            self.listen(client)?;
        }
        Ok(())
    }

    /// Drop notifications already received: the caller is about to read the log, which
    /// covers every commit they announced.
    pub fn discard_pending(&mut self, client: &mut Client) {
        if self.listening {
            let mut pending = client.notifications();
            // Errors surface on the next statement; this is only housekeeping.
            while let Ok(Some(_)) = pending.iter().next() {}
        }
    }

    /// Block until a notification arrives, the fallback poll interval passes (both:
    /// `true`, read the log) or `timeout` passes (`false`).
    pub fn wait(&mut self, client: &mut Client, timeout: Duration) -> Result<bool, PgError> {
        let limit = timeout.min(self.fallback_poll);
        let polled = self.fallback_poll <= timeout;
        if !self.enabled {
            std::thread::sleep(limit);
            return Ok(polled);
        }
        if !self.listening {
            self.listen(client)?;
            // Commits between the host's last read and LISTEN sent nothing we could hear.
            return Ok(true);
        }
        let woken = {
            let mut notifications = client.notifications();
            let first = notifications
                .timeout_iter(limit)
                .next()
                .map_err(PgError::sql("wait for notifications"))?;
            if first.is_some() {
                // Several transactions may have committed; one read covers them all.
                while let Some(_more) = notifications
                    .iter()
                    .next()
                    .map_err(PgError::sql("wait for notifications"))?
                {}
            }
            first.is_some()
        };
        if woken {
            return Ok(true);
        }
        // The driver reports a lost connection as "no notification": check.
        if client.is_closed() {
            return Err(PgError::ConnectionLost(
                "connection closed while waiting for notifications".into(),
            ));
        }
        Ok(polled)
    }
}
