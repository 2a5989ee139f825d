//! subid-core: the pure domain logic of subidd (id ranges, the pool, the block allocator, lease names
//! and labels, /etc/subuid parsing, user-namespace id maps). No I/O, no async, no unsafe.

#![forbid(unsafe_code)]

pub mod alloc;
pub mod idmap;
pub mod kernel;
pub mod lease;
pub mod pool;
pub mod range;
pub mod subid;

pub use alloc::{AllocError, Allocator, BlockState, PoolCounts};
pub use idmap::{
    Extent, MAX_EXTENTS, MapError, MapSide, lease_map, parse_map, render_map, validate_extents,
};
pub use kernel::{KernelNameError, NamespaceKind, RlimitName};
pub use lease::{
    LABEL_KEY_MAX, LABEL_VALUE_MAX, LABELS_MAX, LeaseError, LeaseState, NAME_MAX, validate_label,
    validate_labels, validate_name,
};
pub use pool::{
    ClaimSource, DEFAULT_BASE, DEFAULT_BLOCK, DEFAULT_BLOCKS, FORBIDDEN_IDS, ForeignClaim, IdKind,
    Pool, PoolError, PoolSpec,
};
pub use range::{IdRange, RangeError};
pub use subid::{
    SubidEntry, SubidOverlap, SubidParseError, find_entry, parse_subid, register_subid,
    render_subid_line,
};
