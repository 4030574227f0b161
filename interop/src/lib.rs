//! Interop between leaderz and client-go: a leaderz candidate binary with the same
//! knobs and JSON event log as the client-go candidate in `clientgo-candidate/`, used
//! by the mixed-fleet test and the benchmark.
