//! Unit tests of the expert store (the page-cache registration rule).

use super::*;
use crate::weights::storage::DeviceModel;

fn io(effective: IoMode, device: Option<DeviceModel>) -> IoSetup {
    IoSetup {
        asked: effective,
        effective,
        note: None,
        device,
    }
}

#[test]
fn registration_needs_page_cache_misses_no_emulation_and_room() {
    let gb = 1_000_000_000u64;
    let plain = io(IoMode::PageCache, None);
    assert_eq!(not_registrable(&plain, 16 * gb, Some(128 * gb)), None);
    assert_eq!(
        not_registrable(&plain, 64 * gb, Some(128 * gb)),
        None,
        "exactly half"
    );
    let big = not_registrable(&plain, 65 * gb, Some(128 * gb)).unwrap();
    assert!(
        big.contains("65.00 GB") && big.contains("64.00 GB"),
        "{big}"
    );
    assert!(not_registrable(&plain, gb, None)
        .unwrap()
        .contains("unknown"));
    let direct = not_registrable(&io(IoMode::Direct, None), gb, Some(128 * gb)).unwrap();
    assert!(direct.contains("`direct`"), "{direct}");
    assert!(not_registrable(&io(IoMode::Cold, None), gb, Some(128 * gb)).is_some());
    let nvme = DeviceModel::preset("pcie4-nvme").unwrap();
    let emulated = not_registrable(&io(IoMode::PageCache, Some(nvme)), gb, Some(128 * gb));
    assert!(emulated.unwrap().contains("emulated"));
}
