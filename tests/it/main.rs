//! All integration tests in one binary (one throwaway PostgreSQL for all of them).

mod support;

mod definitions;
mod faults;
mod finish;
mod keys;
mod lifecycle;
mod observability;
mod parallel;
mod plan;
mod resilience;
mod throttling;
mod tls;
