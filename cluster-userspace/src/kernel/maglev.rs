//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table in which every worker
//! id owns about the same number of entries, and which changes little when ids come and go.
//! Adding a worker to N moves about 1/(N+1) of the entries (all to it); removing one moves only
//! its own entries, spread over the others. The table holds worker ids, not slots, so a
//! replacement (same id, new slot) takes its predecessor's clients without any change here.

/// Builds the table of `size` entries (a prime) for `ids`, as `id + 1` (0: no worker).
pub fn table(ids: &[u32], size: u32) -> Vec<u32> {
    let size = size as u64;
    let mut table = vec![0u32; size as usize];
    if ids.is_empty() {
        return table;
    }
    let mut ids: Vec<u32> = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // Each id walks its own permutation of the table: offset, offset+skip, offset+2*skip, ...
    let permutations: Vec<(u64, u64)> = ids
        .iter()
        .map(|&id| {
            let offset = mix(u64::from(id)) % size;
            let skip = mix(u64::from(id) ^ 0x5bd1_e995) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; ids.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, &id) in ids.iter().enumerate() {
            let (offset, skip) = permutations[i];
            // The id's next preferred entry that is still free.
            let mut entry = (offset + next[i] * skip) % size;
            while table[entry as usize] != 0 {
                next[i] += 1;
                entry = (offset + next[i] * skip) % size;
            }
            table[entry as usize] = id + 1;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// splitmix64: a fixed, well-spread function of the id, so the table is the same in every
/// primary (and after an upgrade).
fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_common::TABLE_SIZE;

    fn shares(table: &[u32]) -> std::collections::BTreeMap<u32, usize> {
        let mut shares = std::collections::BTreeMap::new();
        for &entry in table {
            *shares.entry(entry).or_insert(0) += 1;
        }
        shares
    }

    #[test]
    fn every_worker_gets_within_two_percent_of_its_share() {
        for n in [1u32, 2, 3, 4, 16, 100, 1024] {
            let ids: Vec<u32> = (0..n).collect();
            let table = table(&ids, TABLE_SIZE);
            let shares = shares(&table);
            assert_eq!(
                shares.len(),
                n as usize,
                "every id has entries, none is empty"
            );
            let fair = TABLE_SIZE as f64 / n as f64;
            for (id, count) in &shares {
                let off = (*count as f64 - fair).abs() / fair;
                assert!(off < 0.02, "n={n}: id {id} has {count}, fair {fair:.0}");
            }
        }
    }

    #[test]
    fn adding_a_worker_moves_about_one_in_n_plus_one_entries_and_only_to_it() {
        for n in [2u32, 4, 8, 63] {
            let before = table(&(0..n).collect::<Vec<_>>(), TABLE_SIZE);
            let after = table(&(0..=n).collect::<Vec<_>>(), TABLE_SIZE);
            let moved: Vec<(u32, u32)> = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (*a, *b))
                .collect();
            let share = moved.len() as f64 / TABLE_SIZE as f64;
            let ideal = 1.0 / f64::from(n + 1);
            // Maglev moves a little more than the minimum (the paper's trade for balance).
            assert!(
                share >= ideal * 0.9 && share < ideal * 1.5,
                "n={n}: {share:.3} moved, ideal {ideal:.3}"
            );
            let to_new = moved.iter().filter(|(_, b)| *b == n + 1).count();
            assert!(
                to_new as f64 >= moved.len() as f64 * 0.7,
                "n={n}: {to_new} of {} moves go to the new id",
                moved.len()
            );
        }
    }

    #[test]
    fn removing_a_worker_spreads_its_entries_and_moves_no_other() {
        let before = table(&[0, 1, 2, 3, 4, 5], TABLE_SIZE);
        let after = table(&[0, 1, 3, 4, 5], TABLE_SIZE);
        let mut taken_by = std::collections::BTreeMap::new();
        for (a, b) in before.iter().zip(&after) {
            if *a != 3 {
                // An entry of a surviving worker stays with it (Maglev keeps almost all).
                continue;
            }
            *taken_by.entry(*b).or_insert(0usize) += 1;
        }
        assert_eq!(
            taken_by.len(),
            5,
            "spread over every other worker: {taken_by:?}"
        );
        let most = *taken_by.values().max().unwrap() as f64;
        let total: usize = taken_by.values().sum();
        assert!(most / (total as f64) < 0.3, "{taken_by:?}");
        let kept = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| **a != 3 && a == b)
            .count();
        let others = before.iter().filter(|a| **a != 3).count();
        assert!(
            kept as f64 / others as f64 > 0.97,
            "{kept} of {others} kept"
        );
    }

    #[test]
    fn the_table_depends_only_on_the_set_of_ids() {
        assert_eq!(table(&[3, 1, 2], 101), table(&[1, 2, 3, 3], 101));
        assert!(table(&[], 101).iter().all(|&e| e == 0));
    }
}
