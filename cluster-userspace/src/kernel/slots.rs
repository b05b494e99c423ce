//! Slot bookkeeping: which slots of the socket array are taken, and which of those are active
//! (may receive new connections). Pure data, so it is unit-tested without a kernel.
//!
//! A slot belongs to one running worker process, not to a worker id: a replacement started
//! while its predecessor still drains needs a slot of its own. A worker has the same slot in
//! every listen group, so one table serves all groups.

use cluster_common::MAX_SLOTS;

#[derive(Debug)]
pub struct SlotTable {
    taken: Vec<bool>,
    /// Active slots in ascending order: the order round robin walks them.
    active: Vec<u32>,
}

impl Default for SlotTable {
    fn default() -> Self {
        Self::new()
    }
}

impl SlotTable {
    pub fn new() -> Self {
        SlotTable {
            taken: vec![false; MAX_SLOTS as usize],
            active: Vec::new(),
        }
    }

    /// Takes the lowest free slot, or `None` when all [`MAX_SLOTS`] are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        let slot = self.taken.iter().position(|taken| !taken)?;
        self.taken[slot] = true;
        Some(slot as u32)
    }

    /// Takes a given slot (a worker taken over in an upgrade keeps its slot).
    pub fn claim(&mut self, slot: u32) {
        if let Some(taken) = self.taken.get_mut(slot as usize) {
            *taken = true;
        }
    }

    /// Gives a slot back; it also leaves the active set.
    pub fn release(&mut self, slot: u32) {
        self.deactivate(slot);
        if let Some(taken) = self.taken.get_mut(slot as usize) {
            *taken = false;
        }
    }

    /// Lets a taken slot receive new connections. Returns whether the active set changed.
    pub fn activate(&mut self, slot: u32) -> bool {
        if !self.is_taken(slot) {
            return false;
        }
        match self.active.binary_search(&slot) {
            Ok(_) => false,
            Err(at) => {
                self.active.insert(at, slot);
                true
            }
        }
    }

    /// Stops new connections to a slot. Returns whether the active set changed.
    pub fn deactivate(&mut self, slot: u32) -> bool {
        match self.active.binary_search(&slot) {
            Ok(at) => {
                self.active.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_taken(&self, slot: u32) -> bool {
        self.taken.get(slot as usize).copied().unwrap_or(false)
    }

    /// The active slots, densely packed, as the kernel program reads them.
    pub fn active(&self) -> &[u32] {
        &self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_slot_and_reuses_released_ones() {
        let mut table = SlotTable::new();
        assert_eq!(table.allocate(), Some(0));
        assert_eq!(table.allocate(), Some(1));
        assert_eq!(table.allocate(), Some(2));
        table.release(1);
        assert!(!table.is_taken(1));
        assert_eq!(table.allocate(), Some(1));
        assert_eq!(table.allocate(), Some(3));
    }

    #[test]
    fn runs_out_after_max_slots() {
        let mut table = SlotTable::new();
        for expected in 0..MAX_SLOTS {
            assert_eq!(table.allocate(), Some(expected));
        }
        assert_eq!(table.allocate(), None);
        table.release(77);
        assert_eq!(table.allocate(), Some(77));
    }

    #[test]
    fn active_set_is_sorted_dense_and_only_holds_taken_slots() {
        let mut table = SlotTable::new();
        for _ in 0..4 {
            table.allocate();
        }
        assert!(table.activate(3));
        assert!(table.activate(0));
        assert!(table.activate(2));
        assert!(!table.activate(2), "activating twice changes nothing");
        assert!(!table.activate(9), "a free slot cannot be active");
        assert_eq!(table.active(), &[0, 2, 3]);

        assert!(table.deactivate(2));
        assert!(!table.deactivate(2));
        assert_eq!(table.active(), &[0, 3]);

        table.release(0);
        assert_eq!(table.active(), &[3], "releasing a slot deactivates it");
        assert!(table.is_taken(1) && !table.active().contains(&1));
    }
}
