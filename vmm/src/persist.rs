//! The one way Tandem captures and restores state.
//!
//! Every device implements [`Persist`]: `save` returns a plain serde value,
//! `restore` rebuilds the device from such a value plus whatever host
//! resources it needs (files, guest memory). The vCPU's state is read and
//! written with KVM ioctls that can fail, so it is captured by
//! `Vcpu::save`/`Vcpu::restore` into a serde `VcpuState`; together with
//! the devices' states and the logical clock it forms
//! `machine::MachineState`, the one value that snapshots, sync points and
//! migration (and later seeding a secondary) carry. Guest memory travels
//! beside it, page by page (`vstate::memory`).

use serde::{de::DeserializeOwned, Serialize};

/// Capture and restore of one component's state.
pub trait Persist: Sized {
    /// The serializable state.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug;
    /// Host resources needed to rebuild the component (files, memory, ...).
    type ConstructorArgs;
    /// Why a restore failed.
    type Error: std::error::Error;

    /// Capture the component's state.
    fn save(&self) -> Self::State;
    /// Rebuild the component from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Version of the saved-state encoding (`MachineState`, `VcpuState`,
/// `DevicesState`, `LogConfig`), carried in front of every saved value so
/// that snapshots, migration streams, sync points and log headers refuse
/// state written by another format instead of misreading it. Bump it
/// whenever any saved type changes (a field added to one device changes
/// them all). Version 1 was the unversioned postcard of earlier builds;
/// 3: the VM configuration carries the CPU model (name and CPUID table).
pub const STATE_VERSION: u32 = 3;

/// Magic in front of every saved value.
pub const STATE_MAGIC: [u8; 4] = *b"TDST";

/// Errors encoding or decoding saved state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Serializing failed (never an empty value in its place).
    #[error("encoding the {what}: {source}")]
    Encode {
        /// Which value.
        what: &'static str,
        /// The encoder's error.
        source: postcard::Error,
    },
    /// No version header: written before saved state was versioned.
    #[error("the {what} has no state version (saved by a Tandem older than state version {STATE_VERSION}); it cannot be read")]
    Unversioned {
        /// Which value.
        what: &'static str,
    },
    /// Another version.
    #[error(
        "the {what} has state version {found}; this Tandem reads state version {STATE_VERSION}"
    )]
    Version {
        /// Which value.
        what: &'static str,
        /// The version found.
        found: u32,
    },
    /// The right version, but the value does not decode.
    #[error("the {what} does not decode: {source}")]
    Decode {
        /// Which value.
        what: &'static str,
        /// The decoder's error.
        source: postcard::Error,
    },
}

/// Encode `value` (named `what` in errors) with the state version header.
pub fn encode_state<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StateError> {
    let mut out = STATE_MAGIC.to_vec();
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    postcard::to_io(value, &mut out).map_err(|source| StateError::Encode { what, source })?;
    Ok(out)
}

/// Decode a value written by [`encode_state`]; another version is refused
/// by name. The whole input must be used.
pub fn decode_state<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StateError> {
    let Some(rest) = bytes.strip_prefix(&STATE_MAGIC) else {
        return Err(StateError::Unversioned { what });
    };
    let Some((v, body)) = rest.split_first_chunk::<4>() else {
        return Err(StateError::Unversioned { what });
    };
    let found = u32::from_le_bytes(*v);
    if found != STATE_VERSION {
        return Err(StateError::Version { what, found });
    }
    let (value, tail) =
        postcard::take_from_bytes(body).map_err(|source| StateError::Decode { what, source })?;
    if !tail.is_empty() {
        return Err(StateError::Decode {
            what,
            source: postcard::Error::DeserializeBadEncoding,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod state_tests {
    use super::*;

    #[test]
    fn versioned_state_round_trips_and_refuses_other_versions() {
        let v = (7u32, String::from("x"));
        let enc = encode_state("test state", &v).unwrap();
        assert_eq!(
            decode_state::<(u32, String)>("test state", &enc).unwrap(),
            v
        );
        let unversioned = postcard::to_stdvec(&v).unwrap();
        let e = decode_state::<(u32, String)>("test state", &unversioned).unwrap_err();
        assert!(matches!(e, StateError::Unversioned { .. }), "{e}");
        let mut other = enc.clone();
        other[4..8].copy_from_slice(&1u32.to_le_bytes());
        let e = decode_state::<(u32, String)>("test state", &other).unwrap_err();
        assert!(e.to_string().contains("state version 1"), "{e}");
        let mut long = enc;
        long.push(0);
        assert!(decode_state::<(u32, String)>("test state", &long).is_err());
    }
}
