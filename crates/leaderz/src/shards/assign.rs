//! Which member owns which shard: balanced rendezvous (highest-random-weight) hashing.
//!
//! Every member computes the same assignment from the same set of live members, with no
//! coordination: it depends only on the set's name, the shard count and the members'
//! identities.
//!
//! - **Weights.** The weight of member `m` for shard `i` of set `s` is the first 8 bytes
//!   (big-endian) of SHA-256(`"{s}/{i}/{m}"`): stable across versions, platforms and
//!   languages.
//! - **Balance.** With `S` shards and `M` members, exactly `S mod M` members own
//!   ⌈S/M⌉ shards and the others ⌊S/M⌋. (A plain cap of ⌈S/M⌉ per member does not give
//!   that: 10 shards over 4 members could end 3, 3, 3, 1.)
//! - **Few moves.** All (shard, member) pairs are taken in order of falling weight; a
//!   pair is assigned when its shard is still free and its member still has room (below
//!   ⌊S/M⌋, or at ⌊S/M⌋ while fewer than `S mod M` members have gone beyond it). Each
//!   shard goes to its highest-weight member unless that member is full, so a member
//!   joining or leaving moves about the share it gains or loses, plus a few shards where
//!   the quotas shift (measured in the shard simulation: `tests/shards_sim.rs`).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// The rendezvous weight of `member` for `shard` of set `set`.
pub fn weight(set: &str, shard: u32, member: &str) -> u64 {
    let digest = Sha256::digest(format!("{set}/{shard}/{member}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The owner of each of `shards` shards of set `set` among `members` (identities; order
/// and duplicates do not matter): `result[i]` is the owner of shard `i`, `None` only
/// when there are no members.
///
/// ```
/// use leaderz::shards::assign;
///
/// let owners = assign("jobs", 10, &["a", "b", "c", "d"]);
/// let count = |m: &str| owners.iter().filter(|o| o.as_deref() == Some(m)).count();
/// let mut counts: Vec<usize> = ["a", "b", "c", "d"].iter().map(|m| count(m)).collect();
/// counts.sort();
/// assert_eq!(counts, [2, 2, 3, 3]);
/// ```
pub fn assign<S: AsRef<str>>(set: &str, shards: u32, members: &[S]) -> Vec<Option<String>> {
    let mut ids: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut owners: Vec<Option<String>> = vec![None; shards as usize];
    if ids.is_empty() {
        return owners;
    }
    let m = ids.len();
    let floor = shards as usize / m;
    let extra = shards as usize % m;
    let mut pairs: Vec<(u64, usize, u32)> = Vec::with_capacity(shards as usize * m);
    for shard in 0..shards {
        for (i, id) in ids.iter().enumerate() {
            pairs.push((weight(set, shard, id), i, shard));
        }
    }
    // Falling weight; ties (vanishingly rare) by identity, then shard.
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut count = vec![0usize; m];
    let mut above_floor = 0usize;
    let mut left = shards as usize;
    for (_, member, shard) in pairs {
        if left == 0 {
            break;
        }
        let slot = &mut owners[shard as usize];
        if slot.is_some() {
            continue;
        }
        let c = count[member];
        let room = c < floor || (c == floor && above_floor < extra);
        if !room {
            continue;
        }
        if c == floor {
            above_floor += 1;
        }
        count[member] += 1;
        *slot = Some(ids[member].to_owned());
        left -= 1;
    }
    owners
}

/// The shards each member owns under [`assign`], by member.
pub fn by_member(owners: &[Option<String>]) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (shard, owner) in owners.iter().enumerate() {
        if let Some(owner) = owner {
            out.entry(owner.clone())
                .or_default()
                .push(u32::try_from(shard).unwrap_or(u32::MAX));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("member-{i}")).collect()
    }

    #[test]
    fn weights_are_stable() {
        // Pinned: changing the hash would move every shard of every running set.
        assert_eq!(weight("jobs", 0, "a"), weight("jobs", 0, "a"));
        assert_ne!(weight("jobs", 0, "a"), weight("jobs", 1, "a"));
        assert_ne!(weight("jobs", 0, "a"), weight("other", 0, "a"));
        let digest = Sha256::digest(b"jobs/3/pod-a");
        assert_eq!(
            weight("jobs", 3, "pod-a").to_be_bytes(),
            digest[..8],
            "SHA-256 of set/shard/member, first 8 bytes"
        );
    }

    #[test]
    fn nobody_owns_anything_without_members() {
        assert_eq!(assign::<&str>("s", 3, &[]), vec![None, None, None]);
        assert!(assign("s", 0, &["a"]).is_empty());
    }

    #[test]
    fn a_plain_cap_would_leave_a_member_short_but_quotas_do_not() {
        let owners = assign("s", 10, &members(4));
        let mut counts: Vec<usize> = by_member(&owners).values().map(Vec::len).collect();
        counts.sort_unstable();
        assert_eq!(counts, [2, 2, 3, 3]);
    }

    #[test]
    fn a_leaving_member_moves_about_its_share() {
        let all = members(5);
        let before = assign("s", 64, &all);
        let after = assign("s", 64, &all[..4]);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let lost = before
            .iter()
            .filter(|o| o.as_deref() == Some("member-4"))
            .count();
        // The leaver's 12 or 13 must move; the quotas shift a few more.
        assert!(
            moved >= lost && moved <= lost + 8,
            "moved {moved}, lost {lost}"
        );
    }

    proptest! {
        #[test]
        fn balanced_complete_and_order_independent(
            shards in 0u32..200,
            n in 1usize..12,
            seed in any::<u64>(),
        ) {
            let mut ms: Vec<String> = (0..n).map(|i| format!("m{i}-{seed}")).collect();
            let owners = assign("set", shards, &ms);
            prop_assert!(owners.iter().all(Option::is_some));
            let per = by_member(&owners);
            let floor = shards as usize / n;
            let ceil = floor + usize::from(!(shards as usize).is_multiple_of(n));
            for m in &ms {
                let c = per.get(m).map_or(0, Vec::len);
                prop_assert!(c == floor || c == ceil, "{m} owns {c}, not {floor} or {ceil}");
            }
            let full = per.values().filter(|v| v.len() == ceil && ceil > floor).count();
            prop_assert_eq!(full, shards as usize % n);
            ms.reverse();
            ms.push(ms[0].clone());
            prop_assert_eq!(assign("set", shards, &ms), owners);
        }
    }
}
