//! All integration tests in one binary (one throwaway PostgreSQL for all of them).

mod latency_proxy;
mod support;
mod tools;

mod alembic_graph;
mod canary;
mod controls;
mod definitions;
mod errors;
mod faults;
mod finish;
mod fleet;
mod gate;
mod keys;
mod lifecycle;
mod migration;
mod migrators;
mod network;
mod observability;
mod parallel;
mod partitions;
mod plan;
mod privileges;
mod progress_bar;
mod recovery;
mod resilience;
mod revert;
mod secrets;
mod status;
mod sweep;
mod throttling;
mod tls;
