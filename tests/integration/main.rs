//! The integration tests, one binary with one module per area (each test in a network namespace
//! of its own; see cluster_lb_tests::root_test). One binary links the crates once, and libtest
//! packs the slow tests of every area together instead of waiting for the slowest of each
//! binary in turn.

mod balance;
mod cli_errors;
mod config_file;
mod deploys;
mod failures;
mod hardening;
mod health;
mod logs;
mod messages;
mod named_clusters;
mod node;
mod node_conformance;
mod node_primary;
mod packaging;
mod pm2;
mod reconfigure;
mod servers;
mod strategies;
mod supervision;
mod top;
mod unix_sockets;
mod upgrade;
mod watch;
mod zero_downtime;
