//! Fleets: one job over many databases (shards), each with the engine's schema, checkpoint and
//! gate of its own; no state outside the shards. Owns the fleet file and running a command on
//! every shard; never a shard's checkpoint (each shard's engine owns its own).

pub mod file;

pub use file::{load, Fleet, Shard, ShardSettings, DEFAULT_MAX_PARALLEL};

use crate::error::exit;
use futures_util::stream::{self, StreamExt};
use std::future::Future;

/// The command on every shard, at most `max_parallel` at a time, the next starting as soon as
/// one ends (a slow or unreachable shard holds only its own place); answers in the file's order.
pub async fn on_every_shard<'a, T, F, Fut>(fleet: &'a Fleet, each: F) -> Vec<(&'a Shard, T)>
where
    F: Fn(&'a Shard) -> Fut,
    Fut: Future<Output = T>,
{
    let mut answers: Vec<(usize, &Shard, T)> = stream::iter(fleet.shards.iter().enumerate())
        .map(|(i, shard)| {
            let answer = each(shard);
            async move { (i, shard, answer.await) }
        })
        .buffer_unordered(fleet.max_parallel as usize)
        .collect()
        .await;
    answers.sort_by_key(|(i, ..)| *i);
    answers
        .into_iter()
        .map(|(_, shard, answer)| (shard, answer))
        .collect()
}

/// The fleet's exit code from its shards': 130 when one was stopped, else 1 when one failed,
/// else 2 when one was refused as a usage error (a changed definition), else 3 when a
/// precondition or gate was not met on one, else 0 (every shard succeeded).
pub fn exit_code(codes: impl Iterator<Item = u8>) -> u8 {
    let codes: Vec<u8> = codes.collect();
    [
        exit::INTERRUPTED,
        exit::FAILURE,
        exit::USAGE,
        exit::NOT_SATISFIED,
    ]
    .into_iter()
    .find(|c| codes.contains(c))
    .unwrap_or(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_outranks_a_failure_which_outranks_a_refusal_and_a_precondition() {
        assert_eq!(exit_code([0, 0].into_iter()), 0);
        assert_eq!(exit_code([0, 3].into_iter()), 3);
        assert_eq!(exit_code([2, 3, 0].into_iter()), 2);
        assert_eq!(exit_code([3, 1, 2].into_iter()), 1);
        assert_eq!(exit_code([1, 130, 0].into_iter()), 130);
        assert_eq!(exit_code(std::iter::empty()), 0);
    }
}
