//! Backpressure, the same for every source: capture pauses while the offset log holds more
//! than `agent.log_max_bytes` that some sink has not applied.

use std::time::{Duration, Instant};

use crate::log::{LogError, OffsetLog};
use crate::telemetry::Telemetry;

/// How often the log's size is compared with `agent.log_max_bytes` (a lock and a sum): while
/// capture is paused, also how soon it goes on once the sinks have caught up.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Capture (reading the change stream, or copying the snapshot) stops while the log holds more than `max`
/// bytes (the slowest sink is that far behind) and goes on below nine tenths of it; the
/// connection stays alive meanwhile, and the server keeps its log.
pub struct Backpressure {
    max: u64,
    pub paused: bool,
    warned: Option<Instant>,
}

impl Backpressure {
    pub fn new(max: u64) -> Backpressure {
        Backpressure {
            max,
            paused: false,
            warned: None,
        }
    }

    /// Compares the log's size with the limit; while paused, asks for a trim, so the log
    /// shrinks as soon as the sinks have applied what it holds.
    pub fn update(&mut self, log: &OffsetLog, telemetry: &Telemetry) -> Result<(), LogError> {
        let held = log.held_bytes()?;
        self.compare(held, telemetry);
        if self.paused {
            log.want_trim();
        }
        Ok(())
    }

    fn compare(&mut self, held: u64, telemetry: &Telemetry) {
        if !self.paused && held > self.max {
            self.paused = true;
        } else if self.paused && held < self.max / 10 * 9 {
            self.paused = false;
            self.warned = None;
            telemetry.source_paused(None);
            tracing::info!(log_bytes = held, "the sinks caught up; capture goes on");
            return;
        }
        if !self.paused {
            return;
        }
        let reason = format!(
            "the offset log holds about {held} bytes, more than agent.log_max_bytes ({}): the \
             slowest sink is that far behind",
            self.max
        );
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.warned = Some(Instant::now());
            tracing::warn!(
                log_bytes = held,
                limit = self.max,
                "capture paused until the sinks catch up (agent.log_max_bytes); the source keeps \
                 its log meanwhile"
            );
        }
        telemetry.source_paused(Some(reason));
    }
}
