//! Tests driven on the sans-IO [`Machine`] directly, every input and every instant
//! chosen by the test: regressions for the defects a second review of the engine found
//! (coordinated assignments, duplicate identities, lost answers, exhausted tokens), and
//! the handover fast paths (a release without a read; a take at the expiry instant).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use leaderz::config::Coordinated;
use leaderz::machine::{Action, Answer, Input, Machine, Op};
use leaderz::record::{Handoff, HandoffState};
use leaderz::{ElectionConfig, LeaderRecord, LockError, LockEvent, Versioned};
use tokio::time::Instant;

const STRATEGY: &str = "OldestEmulationVersion";

/// What a machine did after an input: the requests it sent and whether a term started.
#[derive(Debug, Default)]
struct Did {
    ops: Vec<Op>,
    started: Option<i32>,
    /// It asked for a watch.
    watched: bool,
    /// The deadline of each request sent.
    deadlines: Vec<Instant>,
}

impl Did {
    fn writes(&self) -> Vec<&LeaderRecord> {
        self.ops
            .iter()
            .filter_map(|o| match o {
                Op::Create(r) | Op::Update(_, r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn reads(&self) -> bool {
        self.ops.iter().any(|o| matches!(o, Op::Get))
    }
}

fn drain(m: &mut Machine) -> Did {
    let mut did = Did::default();
    while let Some(a) = m.poll_action() {
        match a {
            Action::Send(r) => {
                did.deadlines.push(r.deadline);
                did.ops.push(r.op);
            }
            Action::StartTerm { token, .. } => did.started = Some(token),
            Action::Watch { .. } => did.watched = true,
            _ => {}
        }
    }
    did
}

fn step(m: &mut Machine, input: Input, now: Instant) -> Did {
    m.handle(input, now);
    drain(m)
}

fn versioned(record: &LeaderRecord, version: &str) -> Versioned {
    Versioned {
        record: record.clone(),
        version: version.into(),
        lease: None,
    }
}

fn read(record: &LeaderRecord, version: &str) -> Input {
    Input::Reply(Ok(Answer::Read(Some(versioned(record, version)))))
}

fn wrote(record: &LeaderRecord, version: &str) -> Input {
    Input::Reply(Ok(Answer::Wrote(versioned(record, version))))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn coordinated(id: &str) -> ElectionConfig {
    ElectionConfig::new(id).coordinated(Coordinated::new("1.34.0"))
}

fn event(record: &LeaderRecord, version: &str) -> Input {
    Input::WatchEvent(LockEvent::Changed(versioned(record, version)))
}

/// A coordinated machine that first read `first` (None: no Lease) and has its watch open.
fn watching(id: &str, first: Option<&LeaderRecord>, t: Instant) -> Machine {
    let mut m = Machine::new(coordinated(id), "ns/l", t).unwrap();
    assert!(drain(&mut m).reads());
    let answer = match first {
        Some(r) => read(r, "1"),
        None => Input::Reply(Ok(Answer::Read(None))),
    };
    assert!(step(&mut m, answer, t).writes().is_empty());
    step(&mut m, Input::WatchOpened(Ok(())), t);
    m
}

/// Runs the machine's timers from `from` until `until`, answering every read with
/// `current`; the first write and when it was sent.
fn first_write(
    m: &mut Machine,
    current: &LeaderRecord,
    from: Instant,
    until: Instant,
) -> Option<(Instant, LeaderRecord)> {
    let mut now = from;
    loop {
        now = m.poll_timeout()?.max(now);
        if now > until {
            return None;
        }
        let mut did = step(m, Input::Tick, now);
        while did.reads() && did.writes().is_empty() {
            did = step(m, read(current, "99"), now);
        }
        if let Some(w) = did.writes().first() {
            return Some((now, (*w).clone()));
        }
    }
}

/// What the coordinated controller writes when it names `holder`: a strategy, a
/// duration and renewTime, and no acquireTime.
fn assignment(holder: &str, transitions: i32) -> LeaderRecord {
    LeaderRecord {
        holder_identity: holder.into(),
        lease_duration_seconds: Some(15),
        renew_time: Some("2030-01-01T00:00:00Z".parse().unwrap()),
        lease_transitions: transitions,
        strategy: Some(STRATEGY.into()),
        ..Default::default()
    }
}

/// A candidate's own write: it sets acquireTime.
fn held(holder: &str, transitions: i32, renew: &str) -> LeaderRecord {
    LeaderRecord {
        holder_identity: holder.into(),
        lease_duration_seconds: Some(15),
        acquire_time: Some("2030-01-01T00:00:00Z".parse().unwrap()),
        renew_time: Some(renew.parse().unwrap()),
        lease_transitions: transitions,
        strategy: Some(STRATEGY.into()),
        ..Default::default()
    }
}

/// A machine that read `first` and took it; returns it leading, with the record it wrote.
fn leading(
    config: ElectionConfig,
    first: Option<LeaderRecord>,
    t: Instant,
) -> (Machine, Versioned) {
    let mut m = Machine::new(config, "ns/l", t).unwrap();
    assert!(drain(&mut m).reads());
    let did = match &first {
        Some(r) => step(&mut m, read(r, "1"), t),
        None => step(&mut m, Input::Reply(Ok(Answer::Read(None))), t),
    };
    let mine = did.writes()[0].clone();
    let did = step(&mut m, wrote(&mine, "2"), t);
    assert!(did.started.is_some(), "leads: {did:?}");
    (m, versioned(&mine, "2"))
}

/// A second process with the same identity, in coordinated mode, reads the first one's
/// renewal: that is not the controller's assignment, and it must not take it (the two
/// would take it from each other for ever, leading together each time).
#[test]
fn coordinated_a_duplicate_identitys_renewal_is_not_an_assignment() {
    let t0 = Instant::now();
    let mut p1 = watching("pod-a", None, t0);
    let did = step(&mut p1, event(&assignment("pod-a", 0), "1"), t0);
    let mine = versioned(did.writes()[0], "2");
    assert!(
        step(&mut p1, wrote(&mine.record, "2"), t0)
            .started
            .is_some()
    );
    assert!(mine.record.acquire_time.is_some());
    let t1 = t0 + Duration::from_secs(1);
    let mut p2 = Machine::new(coordinated("pod-a"), "ns/l", t1).unwrap();
    drain(&mut p2);
    let did = step(&mut p2, read(&mine.record, "2"), t1);
    assert!(did.writes().is_empty(), "P2 must not write: {did:?}");
    assert_eq!(did.started, None);
}

/// The controller judges expiry by its own wall clock; a candidate it names in place of
/// a live-looking holder starts only once that holder's record expired in its own eyes.
#[test]
fn coordinated_an_assignment_over_a_holder_waits_for_its_record_to_expire() {
    let t0 = Instant::now();
    // pod-a holds (its own write, 15 s).
    let a = held("pod-a", 3, "2030-01-01T00:00:01Z");
    let mut b = watching("pod-b", Some(&a), t0);
    // 2 s later the controller (its clock ahead) names pod-b.
    let t1 = t0 + Duration::from_secs(2);
    let given = assignment("pod-b", 3);
    let did = step(&mut b, event(&given, "6"), t1);
    assert!(
        did.writes().is_empty(),
        "not before pod-a's record expired: {did:?}"
    );
    let (at, take) = first_write(&mut b, &given, t1, t0 + Duration::from_secs(30)).unwrap();
    assert_eq!(
        at,
        t0 + Duration::from_secs(15),
        "takes when pod-a's record expired"
    );
    assert_eq!(take.holder_identity, "pod-b");
}

/// After a release (the controller's ordinary path) an assignment is taken at once.
#[test]
fn coordinated_an_assignment_after_a_release_is_taken_at_once() {
    let t0 = Instant::now();
    let released = held("", 3, "2030-01-01T00:00:01Z");
    let mut b = watching("pod-b", Some(&released), t0);
    let did = step(&mut b, event(&assignment("pod-b", 3), "6"), t0 + ms(300));
    assert_eq!(did.writes().len(), 1, "{did:?}");
}

/// A candidate whose first look finds the Lease already assigned to it (it never saw
/// what the assignment replaced) waits out the assignment's duration.
#[test]
fn coordinated_an_assignment_seen_first_waits_its_duration() {
    let t0 = Instant::now();
    let given = assignment("pod-b", 3);
    let mut b = watching("pod-b", Some(&given), t0);
    let (at, _) = first_write(&mut b, &given, t0, t0 + Duration::from_secs(30)).unwrap();
    assert_eq!(at, t0 + Duration::from_secs(15));
}

/// A coordinated follower of a released Lease whose watch went silent still sees the
/// controller's assignment within a lease duration: it reads the Lease once per lease
/// duration while nobody holds it.
#[test]
fn coordinated_a_released_lease_is_looked_at_despite_a_silent_watch() {
    let t0 = Instant::now();
    let released = held("", 3, "2030-01-01T00:00:01Z");
    let mut b = watching("pod-b", Some(&released), t0);
    // The watch never delivers the assignment.
    let mut now = t0;
    let mut looked = None;
    while now < t0 + Duration::from_secs(40) {
        now = b.poll_timeout().unwrap();
        let did = step(&mut b, Input::Tick, now);
        if did.reads() {
            looked = Some(now - t0);
            break;
        }
    }
    let looked = looked.expect("a read within 40 s");
    assert!(looked <= Duration::from_secs(15), "looked after {looked:?}");
    let did = step(&mut b, read(&assignment("pod-b", 3), "6"), now);
    assert_eq!(did.writes().len(), 1, "{did:?}");
}

/// Releasing on shutdown: a record a same-identity peer (client-go) renewed is not ours
/// to release, though it names our identity and our token.
#[test]
fn shutdown_does_not_release_a_record_another_process_renewed_under_our_name() {
    let t0 = Instant::now();
    let (mut a, mine) = leading(ElectionConfig::new("pod-a"), None, t0);
    let peer = LeaderRecord {
        renew_time: Some("2031-01-01T00:00:00Z".parse().unwrap()),
        ..mine.record.clone()
    };
    step(&mut a, Input::Shutdown, t0 + ms(500));
    // The release names the version of our own last write: the peer's renewal made it
    // stale, so the API server refuses it, and the machine reads.
    let did = step(&mut a, Input::WorkStopped, t0 + ms(600));
    assert!(
        matches!(did.ops.as_slice(), [Op::Update(base, r)] if base.version == mine.version && r.holder_identity.is_empty()),
        "releases on our last write's version: {did:?}"
    );
    let did = step(&mut a, Input::Reply(Err(LockError::Conflict)), t0 + ms(650));
    assert!(did.reads(), "reads after the refused release: {did:?}");
    let did = step(&mut a, read(&peer, "9"), t0 + ms(700));
    assert!(
        did.writes().is_empty(),
        "must not release the peer's lease: {did:?}"
    );
}

/// A handoff acceptance whose answer was lost but which landed: the holder's transfer
/// to us is recognised at once (not waited out as someone else's record).
#[test]
fn a_lost_answer_to_an_accept_still_recognises_the_transfer() {
    let t0 = Instant::now();
    let holder = LeaderRecord {
        holder_identity: "pod-a".into(),
        lease_duration_seconds: Some(15),
        acquire_time: Some("2030-01-01T00:00:00Z".parse().unwrap()),
        renew_time: Some("2030-01-01T00:00:00Z".parse().unwrap()),
        lease_transitions: 4,
        handoff: Some(Handoff::request(Some("pod-b".into()), "h1")),
        ..Default::default()
    };
    let mut b = Machine::new(ElectionConfig::new("pod-b").watch(false), "ns/l", t0).unwrap();
    drain(&mut b);
    let did = step(&mut b, read(&holder, "5"), t0);
    assert_eq!(did.writes().len(), 1, "accepts: {did:?}");
    // The accept lands, its answer is lost.
    let t1 = t0 + Duration::from_secs(1);
    step(&mut b, Input::Reply(Err(LockError::Timeout(ms(1000)))), t1);
    // The holder transfers to pod-b with the next token.
    let mut transferred = LeaderRecord {
        holder_identity: "pod-b".into(),
        lease_transitions: 5,
        ..holder.clone()
    };
    transferred.handoff = transferred
        .handoff
        .map(|h| h.step(HandoffState::Transferred, "pod-b"));
    let mut now = t1;
    let mut took = None;
    while now < t0 + Duration::from_secs(5) {
        now = b.poll_timeout().unwrap();
        let did = step(&mut b, Input::Tick, now);
        if did.reads() {
            let did = step(&mut b, read(&transferred, "7"), now);
            if let Some(w) = did.writes().first() {
                took = Some((now - t0, w.holder_identity.clone()));
                break;
            }
        }
    }
    let (after, who) = took.expect("takes the transferred lease well before it expires");
    assert_eq!(who, "pod-b");
    assert!(after < Duration::from_secs(5), "{after:?}");
}

/// Renewals refused with 409 never landed: they must not push out of memory a renewal
/// whose answer was lost (and which is the record on the Lease). Otherwise the leader
/// mistakes its own landed write for another process using its identity.
#[test]
fn refused_writes_do_not_crowd_out_a_landed_one() {
    let t0 = Instant::now();
    let config = ElectionConfig::new("pod-a").retry_period(ms(500));
    let (mut m, _) = leading(config, None, t0);
    let e500 = || LockError::Api {
        code: 500,
        reason: "InternalError".into(),
        message: "etcd".into(),
    };
    let mut landed: Option<LeaderRecord> = None;
    let mut writes = 0;
    let mut now;
    loop {
        now = m.poll_timeout().unwrap();
        let did = step(&mut m, Input::Tick, now);
        let Some(w) = did.writes().first().map(|w| (*w).clone()) else {
            panic!("no renewal at {:?}: {did:?}", now - t0);
        };
        writes += 1;
        let t = now + ms(10);
        let answer = if landed.is_none() {
            landed = Some(w);
            LockError::Timeout(ms(10)) // lands, answer lost
        } else {
            LockError::Conflict // sent on the stale version
        };
        let did = step(&mut m, Input::Reply(Err(answer)), t);
        assert!(did.reads(), "slow path reads: {did:?}");
        let t = t + ms(10);
        if writes == 10 {
            step(&mut m, read(landed.as_ref().unwrap(), "3"), t);
            break;
        }
        step(&mut m, Input::Reply(Err(e500())), t);
    }
    assert_eq!(m.status().problem, None);
    assert_eq!(
        m.leader(now),
        Some("pod-a"),
        "still leads on its own record"
    );
}

/// A handoff from a leader whose token is the last one: no next token to give, so it
/// releases instead of handing the same token to a second term.
#[test]
fn a_handoff_at_the_last_token_releases_instead() {
    let t0 = Instant::now();
    let base = LeaderRecord {
        holder_identity: String::new(),
        lease_duration_seconds: Some(1),
        lease_transitions: i32::MAX - 1,
        ..Default::default()
    };
    let (mut a, mine) = leading(ElectionConfig::new("pod-a"), Some(base), t0);
    assert_eq!(mine.record.lease_transitions, i32::MAX);
    // pod-b accepts a handoff request on our record.
    let mut accepted = mine.record.clone();
    accepted.handoff =
        Some(Handoff::request(Some("pod-b".into()), "h1").step(HandoffState::Accepted, "pod-b"));
    // Our next renewal conflicts with that edit; the slow path reads it.
    let mut now = a.poll_timeout().unwrap();
    let did = step(&mut a, Input::Tick, now);
    assert_eq!(did.writes().len(), 1);
    now += ms(10);
    assert!(step(&mut a, Input::Reply(Err(LockError::Conflict)), now).reads());
    step(&mut a, read(&accepted, "3"), now);
    // The term ends; once the work stopped, it gives the lease up.
    now += ms(10);
    let mut did = step(&mut a, Input::WorkStopped, now);
    if did.reads() {
        did = step(&mut a, read(&accepted, "3"), now);
    }
    let give = did.writes();
    assert_eq!(give.len(), 1, "{did:?}");
    assert_eq!(
        give[0].holder_identity, "",
        "released, not transferred: {give:?}"
    );
    assert_eq!(give[0].lease_transitions, i32::MAX);
}

/// The controller names us and, before we take the lease, prefers another (two
/// candidates starting together): we give the record back at once instead of leaving
/// the preferred one to wait for it to expire.
#[test]
fn coordinated_an_assignment_taken_back_is_given_back_at_once() {
    let t0 = Instant::now();
    let given = assignment("pod-a", 0);
    // pod-a saw the Lease absent, then the assignment (taken at once) — but suppose
    // the controller changed its mind first: the record it sees prefers pod-b.
    let mut a = watching("pod-a", None, t0);
    let mut taken_back = given.clone();
    taken_back.preferred_holder = Some("pod-b".into());
    let did = step(&mut a, event(&taken_back, "2"), t0 + ms(50));
    let w = did.writes();
    assert_eq!(w.len(), 1, "{did:?}");
    assert_eq!(w[0].holder_identity, "", "given back: {w:?}");
    assert_eq!(w[0].preferred_holder.as_deref(), Some("pod-b"));
    assert_eq!(w[0].strategy.as_deref(), Some(STRATEGY));
    assert_eq!(did.started, None);
}

/// A handoff request of the leader's own whose withdrawing renewal times out (the slow
/// path reads the Lease, still carrying the request) is still withdrawn: the request is
/// forgotten only once a renewal without it succeeded.
#[test]
fn a_hand_over_request_is_withdrawn_even_when_the_withdrawal_times_out() {
    let t0 = Instant::now();
    let (mut m, mine) = leading(ElectionConfig::new("pod-a"), None, t0);
    m.hand_over(Some("pod-b".into()), t0).unwrap();
    let mut did = drain(&mut m);
    let mut current = mine.record;
    let mut version = 3;
    let mut now = t0;
    let mut withdrawal_failed = false;
    while now < t0 + Duration::from_secs(60) {
        let Some(op) = did.ops.pop() else {
            now = m.poll_timeout().expect("a leader always has a timer");
            did = step(&mut m, Input::Tick, now);
            continue;
        };
        version += 1;
        did = match op {
            Op::Update(_, r)
                if current.handoff.is_some() && r.handoff.is_none() && !withdrawal_failed =>
            {
                withdrawal_failed = true;
                step(&mut m, Input::Reply(Err(LockError::Timeout(ms(1000)))), now)
            }
            Op::Update(_, r) | Op::Create(r) => {
                current = r.clone();
                step(&mut m, wrote(&r, &version.to_string()), now)
            }
            Op::Get => step(&mut m, read(&current, &version.to_string()), now),
            _ => unreachable!(),
        };
    }
    assert!(withdrawal_failed, "the test's fault was injected");
    assert_eq!(current.handoff, None, "withdrawn in the end");
    assert!(
        m.hand_over(Some("pod-c".into()), now).is_ok(),
        "nothing pending"
    );
}

/// The same when the holder died without releasing: once its record expired, the
/// coordinated follower keeps looking once per lease duration (the controller's
/// reassignment comes as the next event, which a silent watch would hide).
#[test]
fn coordinated_an_expired_holder_is_looked_at_despite_a_silent_watch() {
    let t0 = Instant::now();
    let dead = held("pod-a", 3, "2030-01-01T00:00:01Z");
    let mut b = watching("pod-b", Some(&dead), t0);
    let mut now = t0;
    let mut reads = Vec::new();
    while now < t0 + Duration::from_secs(60) {
        now = b.poll_timeout().unwrap();
        let did = step(&mut b, Input::Tick, now);
        if did.reads() {
            reads.push(now - t0);
            step(&mut b, read(&dead, "1"), now);
        }
    }
    let after_expiry = reads
        .iter()
        .filter(|t| **t > Duration::from_secs(15))
        .count();
    assert!(after_expiry >= 2, "reads at {reads:?}");
}

// ---- handover fast paths --------------------------------------------------------------

/// A leader shutting down releases on the version of its own last write at once, with no
/// read first: one request between the work stopping and the Lease being free.
#[test]
fn shutdown_releases_on_the_last_write_without_reading_first() {
    let t0 = Instant::now();
    let (mut a, mine) = leading(ElectionConfig::new("pod-a"), None, t0);
    step(&mut a, Input::Shutdown, t0 + ms(500));
    let did = step(&mut a, Input::WorkStopped, t0 + ms(600));
    let [Op::Update(base, released)] = did.ops.as_slice() else {
        panic!("one write, no read: {did:?}");
    };
    assert_eq!(base.version, mine.version);
    assert_eq!(released.holder_identity, "");
    assert_eq!(released.lease_transitions, mine.record.lease_transitions);
}

/// A watching follower reads an expiring record shortly before its expiry, and takes it
/// at the expiry instant itself, without a read's round trip after it; never earlier.
#[test]
fn a_watching_follower_takes_an_expired_record_at_the_expiry_instant() {
    let t0 = Instant::now();
    let config = ElectionConfig::new("pod-b"); // 15 s / 10 s / 2 s: reads 100 ms ahead
    let mut b = Machine::new(config, "ns/l", t0).unwrap();
    assert!(drain(&mut b).reads());
    let other = plain("pod-a", "2030-01-01T00:00:01Z");
    step(&mut b, read(&other, "1"), t0);
    step(&mut b, Input::WatchOpened(Ok(())), t0);
    let expiry = t0 + Duration::from_secs(15);
    // The holder has stopped: the watch is silent, and every read shows the same record.
    let (reads, at, did) = run_until_write(&mut b, &other, t0, expiry + ms(1));
    assert!(reads.contains(&(expiry - ms(100))), "read ahead: {reads:?}");
    assert_eq!(at, expiry, "takes at the expiry: {did:?}");
    assert!(!did.reads(), "no read at the expiry: {did:?}");
    assert_eq!(did.writes()[0].holder_identity, "pod-b");
}

/// The read ahead of the expiry finds a renewal the watch has not shown: no take at the
/// old expiry; the new record expires a lease duration after that read.
#[test]
fn a_read_ahead_of_the_expiry_that_finds_a_renewal_does_not_take() {
    let t0 = Instant::now();
    let mut b = Machine::new(ElectionConfig::new("pod-b"), "ns/l", t0).unwrap();
    drain(&mut b);
    let other = plain("pod-a", "2030-01-01T00:00:01Z");
    step(&mut b, read(&other, "1"), t0);
    step(&mut b, Input::WatchOpened(Ok(())), t0);
    let renewed = plain("pod-a", "2030-01-01T00:00:15Z");
    let ahead = t0 + Duration::from_secs(15) - ms(100);
    let (_, _, did) = run_until_write(&mut b, &other, t0, ahead - ms(1));
    assert!(
        did.writes().is_empty(),
        "no write before the read ahead: {did:?}"
    );
    // Now every read shows the renewal (version 2), first seen at `ahead` + 3 ms.
    let (reads, at, did) = run_until_write(
        &mut b,
        &renewed,
        ahead - ms(1),
        ahead + Duration::from_secs(20),
    );
    assert_eq!(
        reads.last().map(|r| *r - t0),
        Some(at - t0 - ms(100)),
        "read ahead"
    );
    assert_eq!(at, ahead + ms(3) + Duration::from_secs(15));
    assert!(!did.reads(), "{did:?}");
}

/// Runs `m`'s timers from `from`, answering each read 3 ms later with `current` (version
/// "1" for `plain(.., ":01Z")`, else "2"), until it writes or `until` passes: the
/// instants of the reads, and when and what it wrote (`until` and nothing if it did not).
fn run_until_write(
    m: &mut Machine,
    current: &LeaderRecord,
    from: Instant,
    until: Instant,
) -> (Vec<Instant>, Instant, Did) {
    let version = if current.renew_time == plain("x", "2030-01-01T00:00:01Z").renew_time {
        "1"
    } else {
        "2"
    };
    let mut reads = Vec::new();
    let mut now = from;
    loop {
        now = match m.poll_timeout() {
            Some(t) => t.max(now),
            None => return (reads, until, Did::default()),
        };
        if now > until {
            return (reads, until, Did::default());
        }
        let did = step(m, Input::Tick, now);
        if !did.writes().is_empty() {
            return (reads, now, did);
        }
        if did.reads() {
            reads.push(now);
            now += ms(3);
            let did = step(m, read(current, version), now);
            if !did.writes().is_empty() {
                return (reads, now, did);
            }
            if did.watched {
                // The read showed what the watch had not: it is watched anew.
                step(m, Input::WatchOpened(Ok(())), now);
            }
        }
    }
}

/// A record held by `holder` for 15 s, not coordinated.
fn plain(holder: &str, renew: &str) -> LeaderRecord {
    LeaderRecord {
        strategy: None,
        ..held(holder, 3, renew)
    }
}

// ---- found by the machine simulation (MSIM_SEED=9603910489079898985) -------------------

/// A leader steps down to hand over (a handoff was accepted), and giving the Lease up
/// then fails until its time runs out (403s). The machine is a follower again: it must wake
/// by itself to read and campaign, not wait for an input that never comes.
#[test]
fn a_give_up_that_runs_out_of_time_leaves_a_follower_that_wakes() {
    let t0 = Instant::now();
    let (mut a, mine) = leading(ElectionConfig::new("pod-a"), None, t0);
    let now = a.poll_timeout().unwrap();
    let did = step(&mut a, Input::Tick, now);
    assert_eq!(did.writes().len(), 1, "renews: {did:?}");
    let did = step(&mut a, Input::Reply(Err(LockError::Conflict)), now);
    assert!(did.reads(), "{did:?}");
    // A handoff someone requested, accepted by pod-b: the leader ends its term and then
    // transfers the Lease.
    let accepted = LeaderRecord {
        handoff: Some(
            Handoff::request(Some("pod-b".into()), "h1").step(HandoffState::Accepted, "pod-b"),
        ),
        ..mine.record.clone()
    };
    step(&mut a, read(&accepted, "3"), now);
    assert!(a.status().term.is_none(), "stepped down");
    let mut now = now + ms(10);
    let mut did = step(&mut a, Input::WorkStopped, now);
    let forbidden = || {
        Input::Reply(Err(LockError::Forbidden {
            verb: "get",
            namespace: "ns".into(),
            name: "l".into(),
            message: "injected".into(),
        }))
    };
    // Every request is refused until well after giving up must have ended.
    let refuse_until = now + Duration::from_secs(30);
    let mut woke_after = None;
    while now < refuse_until + Duration::from_secs(30) {
        if !did.ops.is_empty() {
            if now >= refuse_until {
                woke_after = Some(now);
                break;
            }
            did = step(&mut a, forbidden(), now);
            continue;
        }
        let Some(t) = a.poll_timeout() else { break };
        now = t.max(now);
        did = step(&mut a, Input::Tick, now);
    }
    assert!(
        woke_after.is_some(),
        "no request after giving up ran out of time (stalled at {:?})",
        now - t0
    );
}

/// A renewal in flight when the leader shuts down lands afterwards: the release is
/// written on the renewal's version, not on the older one (which would meet a 409 and
/// cost a read and another write).
#[test]
fn a_renewal_landing_during_shutdown_is_what_the_release_replaces() {
    let t0 = Instant::now();
    let (mut a, mine) = leading(ElectionConfig::new("pod-a"), None, t0);
    let at = a.poll_timeout().unwrap();
    let did = step(&mut a, Input::Tick, at);
    let renewal = did.writes()[0].clone();
    step(&mut a, Input::Shutdown, at + ms(1));
    step(&mut a, wrote(&renewal, "3"), at + ms(5));
    let did = step(&mut a, Input::WorkStopped, at + ms(10));
    let [Op::Update(base, released)] = did.ops.as_slice() else {
        panic!("one write: {did:?}");
    };
    assert_eq!(base.version, "3", "on the landed renewal's version");
    assert_eq!(released.holder_identity, "");
    assert_eq!(released.lease_transitions, mine.record.lease_transitions);
}

/// Under overload, a leader whose renewals keep failing does not send one more renewal
/// in the last moments of its term, which could not be answered in time and only adds
/// load (seen with 10 000 elections in one process): none with less than a twentieth of
/// the retry period left. The term still ends exactly at its deadline.
#[test]
fn no_renewal_is_sent_too_late_to_count() {
    let t0 = Instant::now();
    let (mut a, _) = leading(ElectionConfig::new("pod-a"), None, t0); // 15 s / 10 s / 2 s
    let deadline = t0 + Duration::from_secs(10);
    let mut now = t0;
    let mut sent = Vec::new();
    let mut did = Did::default();
    while a.status().term.is_some() {
        if did.ops.is_empty() {
            let Some(t) = a.poll_timeout() else { break };
            now = t.max(now);
            did = step(&mut a, Input::Tick, now);
        } else {
            // Each call (the renewal, then the slow path's reads and writes) fails
            // 1.97 s after it was sent, or at its deadline.
            sent.push(now);
            now = (now + ms(1970)).min(did.deadlines[0]);
            did = step(&mut a, Input::Reply(Err(LockError::Timeout(ms(1970)))), now);
        }
    }
    assert_eq!(now, deadline, "the term ends at its deadline");
    for at in &sent {
        assert!(
            deadline - *at >= ms(100),
            "a call sent {:?} before the deadline ({sent:?})",
            deadline - *at
        );
    }
}

/// A renewal that landed but came back as a conflict: kube's default client retries a
/// write answered 503/504 (etcd slow, a proxy timing out) and the retry meets the
/// version the first attempt made. The record on the Lease is the leader's own write:
/// it keeps leading instead of taking it for another process using its identity.
#[test]
fn a_landed_write_answered_with_a_conflict_is_still_ours() {
    let t0 = Instant::now();
    let (mut m, _) = leading(ElectionConfig::new("pod-a").retry_period(ms(500)), None, t0);
    let mut now = m.poll_timeout().unwrap();
    let did = step(&mut m, Input::Tick, now);
    let landed = (*did.writes().first().expect("a renewal")).clone();
    now += ms(10);
    let did = step(&mut m, Input::Reply(Err(LockError::Conflict)), now);
    assert!(did.reads(), "slow path reads: {did:?}");
    now += ms(10);
    let did = step(&mut m, read(&landed, "9"), now);
    assert_eq!(m.status().problem, None);
    assert_eq!(
        m.leader(now),
        Some("pod-a"),
        "still leads on its own record"
    );
    assert_eq!(did.writes().len(), 1, "renews on it: {did:?}");
}

/// Under load a renewal may still wait in the client when its term ends. The elector
/// then drops it unsent (`Input::Unsent`): the release goes out at once, on the version
/// the machine knows (the dropped renewal cannot have landed), instead of after the
/// renewal went out and came back.
#[test]
fn a_renewal_dropped_unsent_frees_the_way_for_the_release() {
    let t0 = Instant::now();
    let mut m = Machine::new(ElectionConfig::new("a"), "ns/l", t0).unwrap();
    assert!(drain(&mut m).reads());
    let did = step(&mut m, Input::Reply(Ok(Answer::Read(None))), t0);
    let taken = did.writes()[0].clone();
    assert!(step(&mut m, wrote(&taken, "1"), t0).started.is_some());
    let t1 = t0 + Duration::from_secs(2);
    let did = step(&mut m, Input::Tick, t1);
    assert_eq!(did.writes().len(), 1, "the renewal");
    // Stop while the renewal waits in the client; the work stops at once.
    step(&mut m, Input::Shutdown, t1 + ms(10));
    let did = step(&mut m, Input::WorkStopped, t1 + ms(20));
    assert!(
        did.ops.is_empty(),
        "one request at a time: the release waits for the renewal"
    );
    let did = step(&mut m, Input::Unsent, t1 + ms(30));
    let release = did.writes();
    assert_eq!(release.len(), 1, "the release goes out at once: {did:?}");
    assert!(release[0].holder_identity.is_empty());
    assert!(matches!(&did.ops[0], Op::Update(v, _) if v.version == "1"));
}

/// A machine whose take was answered 409 after a shutdown, reading to find out whether
/// it landed; the take, and when the machine started.
fn take_answered_409_at_shutdown() -> (Machine, LeaderRecord, Instant) {
    let t0 = Instant::now();
    let mut m = Machine::new(ElectionConfig::new("a"), "ns/l", t0).unwrap();
    assert!(drain(&mut m).reads());
    let did = step(&mut m, Input::Reply(Ok(Answer::Read(None))), t0);
    let take = did.writes()[0].clone();
    step(&mut m, Input::Shutdown, t0 + ms(10));
    let did = step(
        &mut m,
        Input::Reply(Err(LockError::AlreadyExists)),
        t0 + ms(20),
    );
    assert!(did.reads(), "looks for the take: {did:?}");
    (m, take, t0)
}

/// A take outstanding at shutdown answered with a conflict may have landed all the
/// same (kube's client retries a write after a 503 or 504, and the retry of a write that
/// landed meets a 409): the machine reads, and releases the Lease if it shows the take,
/// instead of leaving it to expire with its name on it.
#[test]
fn a_take_answered_409_at_shutdown_is_looked_for_and_released_if_it_landed() {
    let (mut m, take, t0) = take_answered_409_at_shutdown();
    let did = step(&mut m, read(&take, "1"), t0 + ms(30));
    let release = did.writes();
    assert_eq!(release.len(), 1, "releases what landed: {did:?}");
    assert!(release[0].holder_identity.is_empty());
    assert!(matches!(&did.ops[0], Op::Update(v, _) if v.version == "1"));
}

/// The take looked for at shutdown is recognised by what only our write has (holder,
/// transitions, renew time): a handoff request or a `preferredHolder` written on top of
/// it since does not make it someone else's, and it is still released (before, it was
/// left to expire with our name on it, a lease duration with nobody leading).
#[test]
fn a_take_found_at_shutdown_with_an_annotation_on_top_is_still_released() {
    let (mut m, take, t0) = take_answered_409_at_shutdown();
    let mut on_top = take.clone();
    on_top.preferred_holder = Some("b".into());
    let did = step(&mut m, read(&on_top, "2"), t0 + ms(30));
    let release = did.writes();
    assert_eq!(release.len(), 1, "releases what landed: {did:?}");
    assert!(release[0].holder_identity.is_empty());
    assert!(matches!(&did.ops[0], Op::Update(v, _) if v.version == "2"));
}
