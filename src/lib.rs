//! outboxd: a transactional outbox from PostgreSQL to MongoDB.

pub mod check;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod idempotency;
pub mod ingest;
pub mod migrate;
pub mod money;
pub mod mongo;
pub mod notify;
pub mod ops;
pub mod outbox;
pub mod relay;
pub mod shutdown;
pub mod sign;
pub mod status;
pub mod systemd;
pub mod telemetry;
