//! The coordinator: fans calls out to model nodes and runs the ensemble strategies.
//!
//! # Layout
//! A skeleton for now: the SpecFuse and CharED strategies land with the coordinator issue.
