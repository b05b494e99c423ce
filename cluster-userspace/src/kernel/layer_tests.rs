//! The kernel layer on its own, in this process: real sockets, the real program, real
//! connections; which listener accepted each connection is compared with the program's counters.
//! Root tests (eBPF), each in a network namespace of its own, as the integration tests are; the
//! kernel matrix (`cargo xtask vm-test`) runs them on every kernel.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use cluster_lb_tests::root_test;
use cluster_lb_worker::ListenAddr;

use super::{sockets::reuseport_listener, Balancer, Strategy};

const ADDR: &str = "127.0.0.1:9090";

fn group(balancer: &mut Balancer, workers: u32) -> Vec<TcpListener> {
    let addr: ListenAddr = ADDR.parse().expect("address");
    (0..workers)
        .map(|slot| {
            let socket = reuseport_listener(addr, super::sockets::Stack::System).expect("listener");
            balancer.attach(&socket).expect("attach");
            balancer.set_slot(slot, &socket).expect("slot");
            let listener: TcpListener = socket.into();
            listener.set_nonblocking(true).expect("nonblocking");
            listener
        })
        .collect()
}

/// Connects `count` times; after each connect, finds the listener whose queue got it.
fn place(listeners: &[Option<TcpListener>], count: usize) -> Vec<usize> {
    let addr: SocketAddr = ADDR.parse().expect("address");
    let mut accepted = vec![0; listeners.len()];
    for i in 0..count {
        let _client = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect {i}: {e}"));
        let mut found = false;
        for _ in 0..200 {
            for (slot, listener) in listeners.iter().enumerate() {
                let Some(listener) = listener else { continue };
                match listener.accept() {
                    Ok(_) => {
                        accepted[slot] += 1;
                        found = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            if found {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(found, "connection {i} was accepted by no listener");
    }
    accepted
}

#[test]
fn round_robin_counters_match_what_the_listeners_accepted() {
    root_test("kernel_round_robin", || {
        let mut balancer = Balancer::load(Strategy::RoundRobin).expect("loading the program");
        let listeners: Vec<Option<TcpListener>> =
            group(&mut balancer, 4).into_iter().map(Some).collect();
        balancer.set_active(&[0, 1, 2, 3]).expect("active set");

        let accepted = place(&listeners, 400);
        assert_eq!(accepted, vec![100; 4]);
        for slot in 0..4 {
            let stats = balancer.slot_stats(slot).expect("stats");
            assert_eq!(
                stats.selected, accepted[slot as usize] as u64,
                "slot {slot}"
            );
            assert_eq!((stats.fallback, stats.migrated), (0, 0), "slot {slot}");
        }
    });
}

#[test]
fn a_closed_socket_in_the_active_set_is_skipped_and_counted_as_fallback() {
    root_test("kernel_dead_slot", || {
        let mut balancer = Balancer::load(Strategy::RoundRobin).expect("loading the program");
        let mut listeners: Vec<Option<TcpListener>> =
            group(&mut balancer, 3).into_iter().map(Some).collect();
        balancer.set_active(&[0, 1, 2]).expect("active set");
        // The worker of slot 1 dies; the primary has not yet removed it from the active set.
        listeners[1] = None;

        let accepted = place(&listeners, 90);
        assert_eq!(accepted[1], 0);
        assert_eq!(
            accepted[0] + accepted[2],
            90,
            "no connection lost: {accepted:?}"
        );
        let dead = balancer.slot_stats(1).expect("stats");
        assert_eq!(dead.selected, 0);
        assert_eq!(
            dead.fallback, 30,
            "every third pick landed on the dead slot first"
        );
    });
}

#[test]
fn only_active_slots_receive_connections_whatever_the_strategy() {
    root_test("kernel_active_set", || {
        let mut balancer = Balancer::load(Strategy::RoundRobin).expect("loading the program");
        let listeners: Vec<Option<TcpListener>> =
            group(&mut balancer, 4).into_iter().map(Some).collect();

        balancer.set_active(&[1, 3]).expect("active set");
        assert_eq!(place(&listeners, 40), vec![0, 20, 0, 20]);
        // A socket can be in one socket array only: out of this one before the next takes it.
        for slot in 0..4 {
            balancer.clear_slot(slot).expect("clearing a slot");
        }
        drop(balancer);

        // The strategy is fixed when an instance is loaded (the verifier sees it as a
        // constant): another strategy is another instance, attached over the first.
        let mut balancer = Balancer::load(Strategy::Hash).expect("loading the program");
        balancer
            .attach(listeners[0].as_ref().expect("listener"))
            .expect("attach");
        for (slot, listener) in listeners.iter().enumerate() {
            balancer
                .set_slot(slot as u32, listener.as_ref().expect("listener"))
                .expect("slot");
        }
        balancer.set_active(&[0, 1, 2, 3]).expect("active set");
        let hashed = place(&listeners, 200);
        assert!(
            hashed.iter().all(|&n| n > 0),
            "hash reached every slot: {hashed:?}"
        );

        balancer.set_active(&[]).expect("empty active set");
        let fallback = place(&listeners, 20);
        assert_eq!(
            fallback.iter().sum::<usize>(),
            20,
            "the kernel hash still placed them"
        );
        assert_eq!(balancer.unassigned_fallbacks().expect("stats"), 20);
    });
}
