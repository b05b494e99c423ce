//! The sequences that used to lose a worker or confuse systemd, each played once, and the
//! ordinary paths (start, reload, scale, stop) with what they must announce.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::{
    backoff,
    world::{timing, World},
    Announced, Input, ReloadError, Retire, Timing, WorkerState,
};
use crate::supervisor::events::{Departure, Event, ExitStatus, Failure, KillReason, Readiness};

const KILLED: ExitStatus = ExitStatus::Signal(Signal::SIGKILL);

fn ready_cluster(workers: u32) -> World {
    let mut world = World::new(workers, timing(30_000, 1_000, 30_000));
    world.settle();
    world.assert_converged();
    world
}

#[test]
fn the_first_workers_become_ready_and_systemd_hears_ready_once() {
    let mut world = World::new(3, timing(30_000, 1_000, 30_000));
    assert_eq!(world.alive.len(), 3);
    assert!(world.notified.is_empty(), "READY before any worker is");
    world.advance(Duration::from_millis(1_000));
    assert_eq!(
        world.in_state(WorkerState::Ready).len(),
        3,
        "ready by delay"
    );
    assert_eq!(world.notified, [Announced::Ready]);
    let reasons: Vec<Readiness> = world
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Ready { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, [Readiness::Delay; 3]);
}

#[test]
fn a_worker_that_said_online_waits_for_listening_not_for_the_delay() {
    let mut world = World::new(1, timing(30_000, 1_000, 30_000));
    let pid = world.pid(0, WorkerState::Starting);
    world.apply(Input::Online { pid });
    world.advance(Duration::from_secs(5));
    assert_eq!(world.pid(0, WorkerState::Online), pid);
    world.apply(Input::Ready {
        pid,
        how: Readiness::Listening,
    });
    assert_eq!(world.pid(0, WorkerState::Ready), pid);
}

/// `--wait-ready` (PM2's `wait_ready`): `listening` does not put a worker in the active set,
/// its `'ready'` message does; one that never sends it is killed at the ready timeout, with a
/// reason that names the message. Without it, `'ready'` changes nothing.
#[test]
fn under_wait_ready_a_worker_is_active_only_once_it_sends_ready() {
    let policy = super::Policy {
        first_id: 1,
        wait_ready: true,
        ..super::Policy::default()
    };
    let mut world = World::with_policy(2, policy, timing(30_000, 1_000, 10_000), true);
    let (warm, cold) = (
        world.pid(1, WorkerState::Starting),
        world.pid(2, WorkerState::Starting),
    );
    for pid in [warm, cold] {
        world.apply(Input::Online { pid });
        world.apply(Input::Ready {
            pid,
            how: Readiness::Listening,
        });
        assert_eq!(
            world.lifecycle.process(pid).unwrap().state(),
            WorkerState::Online
        );
    }
    assert!(world.active.is_empty(), "active before 'ready'");
    world.advance(Duration::from_secs(2));
    world.apply(Input::Ready {
        pid: warm,
        how: Readiness::Message,
    });
    assert_eq!(world.pid(1, WorkerState::Ready), warm);
    assert_eq!(world.active.iter().copied().collect::<Vec<_>>(), [warm]);
    world.advance(Duration::from_secs(8));
    assert_eq!(world.pid(2, WorkerState::Killed), cold);
    assert!(world.events.iter().any(|e| matches!(e,
        Event::Kill { pid, reason: crate::supervisor::events::KillReason::NeverSentReady(_), .. }
            if *pid == cold.as_raw())));

    let mut plain = World::with_signals(1, timing(30_000, 1_000, 10_000), true);
    let pid = plain.pid(0, WorkerState::Starting);
    plain.apply(Input::Online { pid });
    plain.apply(Input::Ready {
        pid,
        how: Readiness::Message,
    });
    assert_eq!(
        plain.pid(0, WorkerState::Online),
        pid,
        "'ready' counted without --wait-ready"
    );
}

/// A Node worker that takes longer than the delay to say `online` (a loaded machine) is still
/// ready only when it listens; one that never listens is killed at the ready timeout.
#[test]
fn a_worker_that_signals_is_not_made_ready_by_the_delay() {
    let mut world = World::with_signals(2, timing(30_000, 1_000, 10_000), true);
    let slow = world.pid(0, WorkerState::Starting);
    let silent = world.pid(1, WorkerState::Starting);
    world.advance(Duration::from_secs(3));
    assert_eq!(world.pid(0, WorkerState::Starting), slow);
    world.apply(Input::Online { pid: slow });
    world.apply(Input::Ready {
        pid: slow,
        how: Readiness::Listening,
    });
    assert_eq!(world.pid(0, WorkerState::Ready), slow);
    assert_eq!(world.events_named("online").len(), 1);
    world.advance(Duration::from_secs(7));
    assert_eq!(world.pid(1, WorkerState::Killed), silent);
}

/// Issue 10's report: `run -w 2`, reload, SIGKILL the old worker 0 while its replacement starts;
/// the replacement misses the ready timeout. Worker 0 used to be gone for good.
#[test]
fn a_reload_whose_old_worker_dies_and_whose_replacement_never_gets_ready_still_ends_with_every_worker(
) {
    let mut world = World::new(2, timing(30_000, 500, 3_000));
    world.settle();
    let old = world.pid(0, WorkerState::Ready);
    world.apply(Input::Reload);
    let replacement = world.pid(0, WorkerState::Starting);
    world.exit(old, KILLED);
    world.apply(Input::Online { pid: replacement });
    world.advance(Duration::from_millis(3_000));
    assert_eq!(world.pid(0, WorkerState::Killed), replacement);
    assert!(matches!(
        world.reload_replies.as_slice(),
        [Err(ReloadError::NotReadyInTime { id: 0, .. })]
    ));
    world.exit(replacement, KILLED);
    let restarts = world.events_named("restart");
    assert!(!restarts.is_empty(), "worker 0 is restarted");
    world.settle();
    world.assert_converged();
    assert_eq!(world.lifecycle.wanted(), 2);
}

#[test]
fn stopping_during_a_reload_announces_stopping_last_and_answers_the_reload() {
    let mut world = ready_cluster(2);
    world.apply(Input::Reload);
    world.apply(Input::Stop { fast: false });
    assert_eq!(
        world.notified,
        [Announced::Ready, Announced::Reloading, Announced::Stopping]
    );
    assert_eq!(world.reload_replies, [Err(ReloadError::Stopping)]);
    world.settle();
    world.assert_converged();
    assert_eq!(
        world.notified.last(),
        Some(&Announced::Stopping),
        "nothing after STOPPING"
    );
}

#[test]
fn a_worker_that_cannot_be_started_is_retried_with_growing_delays_and_reported() {
    let mut world = World::new(1, timing(30_000, 1_000, 30_000));
    world.settle(); // the first spawn succeeded
    let pid = world.pid(0, WorkerState::Ready);
    world.fail_spawns = 6;
    world.exit(pid, ExitStatus::Code(1));
    for _ in 0..6 {
        let due = world
            .lifecycle
            .next_deadline()
            .expect("a restart is planned");
        world.now = due;
        world.apply(Input::Tick);
    }
    let delays: Vec<Duration> = world
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Restart { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    let expected: Vec<Duration> = (1..=7).map(backoff).collect();
    assert_eq!(delays, expected);
    assert_eq!(world.events_named("start-failed").len(), 6);
    assert!(matches!(
        world.events_named("crash-loop").as_slice(),
        [Event::CrashLoop {
            id: 0,
            failures: 5,
            last: Failure::StartFailed(_)
        }]
    ));
    world.settle();
    world.assert_converged();
}

#[test]
fn a_reload_replaces_every_worker_one_at_a_time() {
    let mut world = ready_cluster(3);
    let old: Vec<_> = world.in_state(WorkerState::Ready);
    world.apply(Input::Reload);
    for id in 0..3 {
        assert_eq!(
            world.in_state(WorkerState::Starting).len(),
            1,
            "one at a time"
        );
        let replacement = world.pid(id, WorkerState::Starting);
        world.apply(Input::Ready {
            pid: replacement,
            how: Readiness::Notify,
        });
        // The old one leaves only now, after its replacement is ready.
        let (_, old_pid) = old[id as usize];
        assert_eq!(world.pid(id, WorkerState::Draining), old_pid);
        world.exit(old_pid, ExitStatus::Code(0));
    }
    assert_eq!(world.reload_replies, [Ok(3)]);
    assert_eq!(
        world.notified,
        [Announced::Ready, Announced::Reloading, Announced::Ready]
    );
    world.settle();
    world.assert_converged();
    assert!(world
        .lifecycle
        .processes()
        .all(|p| !old.iter().any(|(_, pid)| *pid == p.pid)));
    assert_eq!(
        world.lifecycle.restarts(0),
        0,
        "a replacement is not a restart"
    );
}

#[test]
fn with_a_drain_delay_a_replaced_worker_is_out_of_rotation_that_long_before_it_is_asked_to_stop() {
    let mut world = World::new(
        2,
        Timing {
            drain_delay: Duration::from_millis(1_000),
            ..timing(2_000, 100, 5_000)
        },
    );
    world.settle();
    let old = world.pid(0, WorkerState::Ready);
    world.apply(Input::Reload);
    let replacement = world.pid(0, WorkerState::Starting);
    world.apply(Input::Ready {
        pid: replacement,
        how: Readiness::Notify,
    });
    assert_eq!(world.pid(0, WorkerState::Draining), old);
    assert!(!world.active.contains(&old), "out of rotation at once");
    world.advance(Duration::from_millis(999));
    assert!(!world.alive[&old].asked_to_stop, "asked before the delay");
    world.advance(Duration::from_millis(1));
    assert!(world.alive[&old].asked_to_stop);
    // Its grace runs from the ask: killed 2 s later, not 2 s after it left rotation.
    world.advance(Duration::from_millis(1_999));
    assert!(!world.alive[&old].killed);
    world.advance(Duration::from_millis(1));
    assert!(world.alive[&old].killed);
    // A worker that never got a connection (stopped while still starting) is asked at once.
    world.settle();
    world.apply(Input::Scale { workers: 3 });
    let starting = world.pid(2, WorkerState::Starting);
    world.apply(Input::Stop { fast: false });
    assert!(world.alive[&starting].asked_to_stop);
}

#[test]
fn a_draining_worker_that_ignores_the_request_is_killed_after_grace_on_scale_down_and_reload() {
    let mut world = World::new(3, timing(2_000, 100, 5_000));
    world.settle();
    let stubborn = world.pid(2, WorkerState::Ready);
    world.apply(Input::Scale { workers: 2 });
    assert_eq!(world.pid(2, WorkerState::Draining), stubborn);
    world.advance(Duration::from_millis(1_999));
    assert!(!world.alive[&stubborn].killed);
    world.advance(Duration::from_millis(1));
    assert!(world.alive[&stubborn].killed);
    assert!(world.events.iter().any(|e| matches!(
        e,
        Event::Kill {
            reason: KillReason::GraceOver(_),
            ..
        }
    )));
    world.exit(stubborn, KILLED);

    let old = world.pid(0, WorkerState::Ready);
    world.apply(Input::Reload);
    let replacement = world.pid(0, WorkerState::Starting);
    world.apply(Input::Ready {
        pid: replacement,
        how: Readiness::Listening,
    });
    world.advance(Duration::from_millis(2_000));
    assert!(
        world.alive[&old].killed,
        "the replaced worker is killed too"
    );
    world.settle();
    world.assert_converged();
}

#[test]
fn a_worker_that_leaves_by_itself_is_replaced_after_a_backoff_and_is_not_signalled() {
    let mut world = ready_cluster(2);
    let pid = world.pid(1, WorkerState::Ready);
    world.apply(Input::Leaving {
        pid,
        why: Departure::WorkerDisconnected,
    });
    assert!(!world.alive[&pid].asked_to_stop, "it is closing by itself");
    assert!(!world.active.contains(&pid));
    assert!(matches!(
        world.events_named("restart").as_slice(),
        [Event::Restart { id: 1, delay }] if *delay == backoff(1)
    ));
    world.exit(pid, ExitStatus::Code(0));
    world.settle();
    world.assert_converged();
}

#[test]
fn a_worker_asked_to_go_by_the_operator_is_replaced_at_once() {
    let mut world = ready_cluster(2);
    let pid = world.pid(0, WorkerState::Ready);
    world.apply(Input::Leaving {
        pid,
        why: Departure::Asked,
    });
    assert!(world.alive[&pid].asked_to_stop);
    assert_eq!(
        world.in_state(WorkerState::Starting).len(),
        1,
        "replaced at once"
    );
    assert_eq!(world.lifecycle.restarts(0), 1);
    world.settle();
    world.assert_converged();
}

#[test]
fn failures_after_ten_seconds_of_readiness_start_the_backoff_afresh() {
    let mut world = ready_cluster(1);
    for _ in 0..3 {
        let pid = world.pid(0, WorkerState::Ready);
        world.exit(pid, ExitStatus::Code(1));
        world.settle();
    }
    let last = world.events_named("restart").last().cloned().cloned();
    assert_eq!(
        last,
        Some(Event::Restart {
            id: 0,
            delay: backoff(3)
        })
    );
    world.advance(Duration::from_secs(10));
    let pid = world.pid(0, WorkerState::Ready);
    world.exit(pid, ExitStatus::Code(1));
    let last = world.events_named("restart").last().cloned().cloned();
    assert_eq!(
        last,
        Some(Event::Restart {
            id: 0,
            delay: backoff(1)
        })
    );
}

#[test]
fn a_worker_that_never_gets_ready_is_killed_and_retried_and_the_loop_is_reported() {
    let mut world = World::new(1, timing(1_000, 500, 2_000));
    for _ in 0..5 {
        let pid = world.pid(0, WorkerState::Starting);
        world.apply(Input::Online { pid });
        world.advance(Duration::from_millis(2_000));
        world.exit(pid, KILLED);
        let due = world.lifecycle.next_deadline().expect("restart planned");
        world.now = due;
        world.apply(Input::Tick);
    }
    assert!(matches!(
        world.events_named("crash-loop").as_slice(),
        [Event::CrashLoop {
            failures: 5,
            last: Failure::NotReady,
            ..
        }]
    ));
    world.settle();
    world.assert_converged();
}

#[test]
fn a_second_stop_kills_what_is_left_and_a_fast_stop_kills_at_once() {
    let mut world = ready_cluster(2);
    world.apply(Input::Stop { fast: false });
    assert!(world.alive.values().all(|p| p.asked_to_stop && !p.killed));
    world.apply(Input::Stop { fast: false });
    assert!(world.alive.values().all(|p| p.killed));
    world.settle();
    world.assert_converged();

    let mut world = ready_cluster(2);
    world.apply(Input::Stop { fast: true });
    assert!(world.alive.values().all(|p| p.killed));
    assert!(world.active.is_empty());
    world.settle();
    world.assert_converged();
}

#[test]
fn reload_and_scale_are_refused_or_ignored_while_stopping() {
    let mut world = ready_cluster(2);
    world.apply(Input::Stop { fast: false });
    world.apply(Input::Reload);
    assert_eq!(world.reload_replies, [Err(ReloadError::Stopping)]);
    world.apply(Input::Scale { workers: 5 });
    assert_eq!(world.lifecycle.wanted(), 2);
    world.settle();
    world.assert_converged();
}

#[test]
fn a_draining_worker_whose_channel_closed_gets_sigterm_after_lingering_then_sigkill_after_grace() {
    let mut world = World::new(2, timing(10_000, 100, 5_000));
    world.settle();
    let pid = world.pid(1, WorkerState::Ready);
    world.apply(Input::Scale { workers: 1 });
    assert!(world.alive[&pid].asked_to_stop);
    world.apply(Input::ChannelClosed { pid });
    world.advance(super::LINGER - Duration::from_millis(1));
    assert!(!world.alive[&pid].terminated, "it may still exit by itself");
    world.advance(Duration::from_millis(1));
    assert!(world.alive[&pid].terminated);
    assert!(!world.alive[&pid].killed);
    world.advance(Duration::from_secs(10));
    assert!(
        world.alive[&pid].killed,
        "SIGKILL after --grace all the same"
    );
}

/// Node's `worker.disconnect()` never kills a worker: it leaves once its event loop is empty,
/// however long its connections last (Node's test-cluster-worker-no-exit). A worker the
/// program's primary lets go is not terminated when its channel closes; only --grace bounds it.
#[test]
fn a_worker_the_program_lets_go_lingers_past_its_channel_closing_until_grace() {
    let mut world = node_primary(super::Count::Program, 0);
    world.apply(Input::Fork { variant: 0 });
    world.settle();
    let pid = world.pid(1, WorkerState::Ready);
    world.apply(Input::Unwant {
        id: 1,
        why: Departure::LetGo,
    });
    assert!(
        !world.alive[&pid].asked_to_stop,
        "the program asked already"
    );
    world.apply(Input::ChannelClosed { pid });
    world.advance(super::LINGER * 5);
    assert!(!world.alive[&pid].terminated, "no SIGTERM: it may serve on");
    assert!(!world.alive[&pid].killed);
    world.advance(Duration::from_secs(30));
    assert!(world.alive[&pid].killed, "SIGKILL after --grace");
}

/// Issue 23: a reload while every worker is waiting for its restart (a crash loop) replaced
/// nothing, and used to answer "reload complete: 0 workers replaced".
#[test]
fn a_reload_with_no_worker_running_reports_that_it_replaced_nothing() {
    let mut world = ready_cluster(2);
    world.fail_spawns = 100;
    for id in 0..2 {
        let pid = world.pid(id, WorkerState::Ready);
        world.exit(pid, KILLED);
    }
    assert!(world.alive.is_empty(), "both are waiting for their restart");
    world.apply(Input::Reload);
    assert_eq!(
        world.reload_replies,
        [Err(ReloadError::NothingRunning { wanted: 2 })]
    );
    world.fail_spawns = 0;
    world.settle();
    world.assert_converged();
}

// ---- the program's primary ----------------------------------------------------------------

fn node_primary(count: super::Count, workers: u32) -> World {
    let policy = super::Policy {
        first_id: 1,
        restart: super::Restart::Cluster,
        count,
        wait_ready: false,
    };
    let mut world = World::with_policy(workers, policy, timing(30_000, 1_000, 30_000), true);
    world.apply(Input::StartPrimary { detected: false });
    world
}

fn bound(world: &World) -> Vec<u32> {
    world
        .answers
        .iter()
        .filter_map(|a| match a {
            super::ForkAnswer::Bound { id, .. } => Some(*id),
            super::ForkAnswer::Refused(_) => None,
        })
        .collect()
}

#[test]
fn the_programs_forks_start_its_workers_numbered_from_one() {
    let mut world = node_primary(super::Count::Program, 0);
    assert!(world.alive.is_empty(), "a worker before the program forked");
    for _ in 0..3 {
        world.apply(Input::Fork { variant: 0 });
    }
    assert_eq!(bound(&world), [1, 2, 3]);
    world.settle();
    world.assert_converged();
}

#[test]
fn a_fork_from_an_exit_handler_takes_the_replacement_and_the_count_stays() {
    let mut world = node_primary(super::Count::Program, 0);
    for _ in 0..2 {
        world.apply(Input::Fork { variant: 0 });
    }
    world.settle();
    for _ in 0..10 {
        let pid = world.pid(1, WorkerState::Ready);
        world.exit(pid, KILLED);
        // The program's exit handler forks at once, before cluster-lb's restart is due.
        world.apply(Input::Fork { variant: 0 });
        world.settle();
    }
    assert_eq!(world.lifecycle.wanted_ids().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(world.alive.len(), 2);
    world.assert_converged();
}

#[test]
fn workers_started_before_the_primary_are_taken_by_its_forks_and_the_rest_leave() {
    // Three workers ran before a worker's read of cluster.isPrimary started the primary,
    // which forks two: those take two of them; the third leaves once the primary settled.
    let policy = super::Policy {
        first_id: 1,
        restart: super::Restart::Cluster,
        count: super::Count::Program,
        wait_ready: false,
    };
    let mut world = World::with_policy(3, policy, timing(30_000, 1_000, 30_000), true);
    world.settle();
    world.apply(Input::StartPrimary { detected: true });
    world.apply(Input::Fork { variant: 0 });
    world.apply(Input::Fork { variant: 0 });
    assert_eq!(bound(&world), [1, 2]);
    assert_eq!(world.alive.len(), 3, "a fork started a process of its own");
    world.advance(super::SETTLE);
    world.settle();
    assert_eq!(world.lifecycle.wanted_ids().collect::<Vec<_>>(), [1, 2]);
    world.assert_converged();
}

#[test]
fn with_w_the_count_is_cluster_lbs_and_a_fork_beyond_it_is_refused() {
    let mut world = node_primary(super::Count::Fixed, 2);
    world.settle();
    world.apply(Input::Fork { variant: 0 });
    world.apply(Input::Fork { variant: 0 });
    world.apply(Input::Fork { variant: 0 });
    assert_eq!(bound(&world), [1, 2]);
    assert!(
        matches!(world.answers.last(), Some(super::ForkAnswer::Refused(why)) if why.contains("-w 2")),
        "{:?}",
        world.answers
    );
    // A worker the program lets go is served again: -w decides.
    world.apply(Input::Unwant {
        id: 1,
        why: Departure::LetGo,
    });
    let pid = world.pid(1, WorkerState::Ready);
    world.exit(pid, KILLED);
    world.settle();
    world.assert_converged();
}

#[test]
fn the_primary_done_with_status_0_stops_the_cluster_and_one_that_crashes_comes_back() {
    let mut world = node_primary(super::Count::Program, 0);
    world.apply(Input::Fork { variant: 0 });
    world.settle();
    world.primary_exit(ExitStatus::Code(1));
    assert!(world.primary.is_none());
    assert_eq!(world.alive.len(), 1, "the workers keep serving");
    world.settle();
    assert!(world.primary.is_some(), "not restarted");
    world.primary_exit(ExitStatus::Code(0));
    world.settle();
    assert!(world.lifecycle.is_finished());
    world.assert_converged();
}

#[test]
fn a_primary_started_on_a_guess_that_forks_nothing_is_not_started_again() {
    let mut world = World::new(2, timing(30_000, 1_000, 30_000));
    world.settle();
    world.apply(Input::StartPrimary { detected: true });
    world.primary_exit(ExitStatus::Code(1));
    world.settle();
    assert!(world.primary.is_none());
    assert!(!world.lifecycle.has_primary());
    assert_eq!(world.events_named("primary-unused").len(), 1);
    world.assert_converged();
}

// ---- health: stalls, hangs and limits ----

fn ready_count(world: &World) -> usize {
    world.in_state(WorkerState::Ready).len()
}

#[test]
fn a_stalled_worker_leaves_the_active_set_and_comes_back_when_it_drains() {
    let mut world = ready_cluster(3);
    let slow = world.pid(1, WorkerState::Ready);
    world.apply(Input::Stalled { pid: slow });
    assert!(
        !world.active.contains(&slow),
        "a stalled worker gets nothing new"
    );
    assert_eq!(world.active.len(), 2);
    assert_eq!(world.events_named("stalled").len(), 1);
    // A stall is no failure: nothing is started or stopped.
    assert_eq!(world.alive.len(), 3);
    world.apply(Input::Unstalled { pid: slow });
    assert!(world.active.contains(&slow));
    assert_eq!(world.events_named("unstalled").len(), 1);
    world.settle();
    world.assert_converged();
}

#[test]
fn a_hung_worker_is_replaced_first_then_killed_and_gets_nothing_meanwhile() {
    let mut world = ready_cluster(2);
    let hung = world.pid(0, WorkerState::Ready);
    world.apply(Input::Stalled { pid: hung });
    world.apply(Input::Retire {
        pid: hung,
        why: Retire::Hung {
            stalled: Duration::from_secs(30),
        },
    });
    assert_eq!(world.events_named("hung").len(), 1);
    let replacement = world.pid(0, WorkerState::Starting);
    // Draining its queue does not bring a hung worker back.
    world.apply(Input::Unstalled { pid: hung });
    assert!(!world.active.contains(&hung));
    assert!(
        !world.alive[&hung].killed,
        "killed before its replacement is ready"
    );
    world.apply(Input::Ready {
        pid: replacement,
        how: Readiness::Listening,
    });
    assert!(
        world.alive[&hung].killed,
        "killed once its replacement is ready"
    );
    assert!(world.active.contains(&replacement));
    assert_eq!(world.events_named("recycled").len(), 1);
    world.exit(hung, KILLED);
    assert_eq!(
        world.lifecycle.restarts(0),
        0,
        "a replacement is not a restart"
    );
    world.settle();
    world.assert_converged();
}

#[test]
fn workers_over_a_limit_are_replaced_one_at_a_time_and_capacity_never_drops() {
    let mut world = ready_cluster(3);
    let old: Vec<_> = world.in_state(WorkerState::Ready);
    for (_, pid) in &old {
        world.apply(Input::Retire {
            pid: *pid,
            why: Retire::Memory {
                bytes: 600 << 20,
                limit: 512 << 20,
            },
        });
    }
    assert_eq!(world.events_named("memory-limit").len(), 3);
    for _ in 0..3 {
        assert_eq!(
            world.in_state(WorkerState::Starting).len(),
            1,
            "one replacement at a time"
        );
        assert_eq!(ready_count(&world), 3, "every old worker serves meanwhile");
        let (id, replacement) = world.in_state(WorkerState::Starting)[0];
        world.apply(Input::Ready {
            pid: replacement,
            how: Readiness::Notify,
        });
        // The old one drains only now, and is not killed.
        let draining = world.pid(id, WorkerState::Draining);
        assert!(old.contains(&(id, draining)));
        assert!(!world.alive[&draining].killed);
        assert_eq!(ready_count(&world), 3);
        world.exit(draining, ExitStatus::Code(0));
    }
    assert_eq!(world.events_named("recycled").len(), 3);
    world.settle();
    world.assert_converged();
    assert!(world
        .lifecycle
        .processes()
        .all(|p| !old.iter().any(|(_, pid)| *pid == p.pid)));
}

#[test]
fn a_replacement_that_fails_is_tried_again_while_the_old_worker_serves() {
    let mut world = ready_cluster(1);
    let old = world.pid(0, WorkerState::Ready);
    world.apply(Input::Retire {
        pid: old,
        why: Retire::Connections {
            count: 1000,
            limit: 1000,
        },
    });
    let first = world.pid(0, WorkerState::Starting);
    world.exit(first, ExitStatus::Code(1));
    assert_eq!(
        world.pid(0, WorkerState::Ready),
        old,
        "the old one still serves"
    );
    assert!(world.active.contains(&old));
    world.settle();
    world.assert_converged();
    assert!(!world.alive.contains_key(&old), "replaced in the end");
}

#[test]
fn over_the_hard_memory_ceiling_a_worker_is_killed_at_once_and_restarted() {
    let mut world = ready_cluster(2);
    let big = world.pid(1, WorkerState::Ready);
    world.apply(Input::KillNow {
        pid: big,
        reason: KillReason::MemoryHard {
            bytes: 3 << 30,
            limit: 2 << 30,
        },
    });
    assert!(world.alive[&big].killed);
    assert!(!world.active.contains(&big));
    let limits: Vec<_> = world.events_named("memory-limit");
    assert!(matches!(
        limits[..],
        [Event::MemoryLimit { hard: true, .. }]
    ));
    world.exit(big, KILLED);
    world.settle();
    world.assert_converged();
    assert_eq!(world.lifecycle.restarts(1), 1);
}

#[test]
fn a_retirement_under_way_finishes_before_a_reload_takes_its_worker() {
    let mut world = ready_cluster(2);
    let old = world.pid(0, WorkerState::Ready);
    world.apply(Input::Retire {
        pid: old,
        why: Retire::Age {
            age: Duration::from_secs(3600),
        },
    });
    world.apply(Input::Reload);
    // Worker 0 has its retirement's replacement starting; the reload waits for it.
    let candidates = |world: &World, id: u32| {
        world
            .lifecycle
            .processes()
            .filter(|p| p.id == id)
            .filter(|p| matches!(p.state(), WorkerState::Starting | WorkerState::Ready))
            .count()
    };
    assert!(candidates(&world, 0) <= 2);
    world.settle();
    world.assert_converged();
    assert_eq!(world.reload_replies, [Ok(2)]);
}

/// A reload's first replacement is its canary: however it fails, the reload ends there, no
/// old worker has left, and the cluster keeps (and restarts with) the configuration it had.
#[test]
fn a_reload_stops_at_its_canary_when_it_fails_and_no_old_worker_is_replaced() {
    for failure in 0..4 {
        let mut world = World::new(3, timing(30_000, 1_000, 3_000));
        world.settle();
        let old: Vec<_> = world.in_state(WorkerState::Ready);
        if failure == 3 {
            world.fail_spawns = 1;
        }
        world.apply(Input::Reload);
        let starting = world.in_state(WorkerState::Starting);
        match failure {
            0 => {
                let [(0, canary)] = starting.as_slice() else {
                    panic!("one canary: {starting:?}");
                };
                world.exit(*canary, ExitStatus::Code(1));
            }
            1 => {
                let [(0, canary)] = starting.as_slice() else {
                    panic!("one canary: {starting:?}");
                };
                world.apply(Input::Online { pid: *canary });
                world.advance(Duration::from_millis(3_000));
                world.exit(*canary, KILLED);
            }
            2 => {
                let [(0, canary)] = starting.as_slice() else {
                    panic!("one canary: {starting:?}");
                };
                world.apply(Input::Leaving {
                    pid: *canary,
                    why: Departure::ProtocolViolation("garbage".into()),
                });
                world.exit(*canary, ExitStatus::Code(0));
            }
            _ => assert!(starting.is_empty(), "{starting:?}"),
        }
        assert!(
            matches!(
                (failure, world.reload_replies.as_slice()),
                (0, [Err(ReloadError::ReplacementExited { id: 0, .. })])
                    | (1, [Err(ReloadError::NotReadyInTime { id: 0, .. })])
                    | (2, [Err(ReloadError::ReplacementLeft { id: 0, .. })])
                    | (3, [Err(ReloadError::StartFailed { id: 0, .. })])
            ),
            "{failure}: {:?}",
            world.reload_replies
        );
        assert!(!world.lifecycle.is_reloading());
        assert_eq!(world.in_state(WorkerState::Ready), old, "{failure}");
        assert!(
            world.in_state(WorkerState::Starting).is_empty(),
            "{failure}"
        );
        assert!(
            !world.events.iter().any(|e| matches!(
                e,
                Event::Disconnect {
                    reason: Departure::Replaced,
                    ..
                }
            )),
            "{failure}: an old worker was replaced"
        );
        // The reload's configuration was dropped; a crash restarts with the old one.
        assert_eq!(world.configs.current, 0);
        assert!(world.configs.discarded.contains(&1), "{failure}");
        world.exit(old[1].1, ExitStatus::Code(1));
        world.settle();
        world.assert_converged();
        assert!(
            world.configs.of.values().all(|c| *c == 0),
            "{failure}: {:?}",
            world.configs.of
        );
    }
}

#[test]
fn a_reload_takes_its_configuration_once_the_canary_is_ready_and_then_replaces_the_others() {
    let mut world = ready_cluster(3);
    let old: Vec<_> = world.in_state(WorkerState::Ready);
    world.apply(Input::Reload);
    let canary = world.pid(0, WorkerState::Starting);
    assert_eq!(world.configs.of[&canary], 1, "the canary runs the reload's");
    assert_eq!(world.configs.current, 0, "nothing else does yet");
    world.apply(Input::Ready {
        pid: canary,
        how: Readiness::Notify,
    });
    assert_eq!(world.configs.current, 1, "the cluster's now");
    assert_eq!(world.pid(0, WorkerState::Draining), old[0].1);
    for id in 1..3 {
        let replacement = world.pid(id, WorkerState::Starting);
        assert_eq!(world.configs.of[&replacement], 1);
        world.apply(Input::Ready {
            pid: replacement,
            how: Readiness::Notify,
        });
    }
    assert_eq!(world.reload_replies, [Ok(3)]);
    world.settle();
    world.assert_converged();
}

/// While the canary starts, a worker that crashes is restarted with the configuration the
/// cluster has (the reload's is not proven yet); the reload replaces it in its turn.
#[test]
fn a_worker_restarted_while_the_canary_starts_runs_the_old_configuration_until_replaced() {
    let mut world = ready_cluster(3);
    world.apply(Input::Reload);
    let canary = world.pid(0, WorkerState::Starting);
    let crashed = world.pid(2, WorkerState::Ready);
    world.exit(crashed, ExitStatus::Code(1));
    world.advance(backoff(1));
    let restarted = world.pid(2, WorkerState::Starting);
    assert_eq!(world.configs.of[&restarted], 0, "not the canary's");
    world.apply(Input::Ready {
        pid: restarted,
        how: Readiness::Notify,
    });
    world.apply(Input::Ready {
        pid: canary,
        how: Readiness::Notify,
    });
    world.settle();
    assert_eq!(world.reload_replies, [Ok(3)]);
    assert!(
        world.lifecycle.processes().all(|p| p.pid != restarted),
        "the restarted worker was replaced too"
    );
    world.assert_converged();
}
