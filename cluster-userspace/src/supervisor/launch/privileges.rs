//! `--user` / `--group`: whom the workers run as. Resolved once in the primary, applied in each
//! forked child before exec (see `spawn`).

use std::ffi::CString;

use nix::unistd::{getgrouplist, Gid, Group, User};

use crate::supervisor::launch::spawn::Credentials;

/// Why `--user` / `--group` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("--group needs --user")]
    GroupWithoutUser,
    #[error("--user {0}: no such user on this system")]
    NoSuchUser(String),
    #[error("--group {0}: no such group on this system")]
    NoSuchGroup(String),
    #[error("looking up {what}: {source}")]
    Lookup {
        what: String,
        source: nix::errno::Errno,
    },
    #[error("user name {0:?} contains a NUL byte")]
    NulByte(String),
    #[error("--user {user} needs {missing} in the primary ({why}); run it as root with them, or add them to the container or unit")]
    MissingCapabilities {
        user: String,
        missing: String,
        why: &'static str,
    },
}

/// Capabilities the primary uses on workers of another user, with what for (bit numbers from
/// linux/capability.h).
const FOR_OTHER_USER: [(u32, &str); 3] = [(6, "CAP_SETGID"), (7, "CAP_SETUID"), (5, "CAP_KILL")];

/// Fails in one line when the primary could start workers as `credentials` but not stop them,
/// or not start them at all: without CAP_KILL its signals to another user's workers fail, and
/// a stop would wait for them forever. Running as that very user needs none of this.
pub fn require_capabilities(credentials: Option<&Credentials>) -> Result<(), UserError> {
    let Some(credentials) = credentials else {
        return Ok(());
    };
    if credentials.uid == nix::unistd::geteuid().as_raw() {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // Unknown (no /proc): let the kernel say no later rather than refuse here.
    let Some(effective) = effective_capabilities(&status) else {
        return Ok(());
    };
    let missing: Vec<&str> = FOR_OTHER_USER
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(UserError::MissingCapabilities {
        user: credentials.name.clone(),
        missing: missing.join(", "),
        why: "SETUID and SETGID to start its workers as that user, KILL to stop them",
    })
}

/// The CapEff mask of a /proc/PID/status text.
fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Looks up `user` (name or uid) and `group` (name or gid; default: the user's primary group).
/// The supplementary groups are the user's, as `initgroups` would set them.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, UserError> {
    let Some(user) = user else {
        if group.is_some() {
            return Err(UserError::GroupWithoutUser);
        }
        return Ok(None);
    };
    let account = lookup_user(user)?;
    let gid = match group {
        Some(group) => lookup_group(group)?,
        None => account.gid,
    };
    let name = CString::new(account.name.as_bytes())
        .map_err(|_| UserError::NulByte(account.name.clone()))?;
    let mut groups: Vec<libc::gid_t> = getgrouplist(&name, gid)
        .map_err(|source| UserError::Lookup {
            what: format!("the groups of user {}", account.name),
            source,
        })?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(Some(Credentials {
        name: account.name.clone(),
        home: account.dir.display().to_string(),
        uid: account.uid.as_raw(),
        gid: gid.as_raw(),
        groups,
    }))
}

fn lookup_user(user: &str) -> Result<User, UserError> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()),
        Err(_) => User::from_name(user),
    };
    found
        .map_err(|source| UserError::Lookup {
            what: format!("user {user}"),
            source,
        })?
        .ok_or_else(|| UserError::NoSuchUser(user.into()))
}

fn lookup_group(group: &str) -> Result<Gid, UserError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    Ok(Group::from_name(group)
        .map_err(|source| UserError::Lookup {
            what: format!("group {group}"),
            source,
        })?
        .ok_or_else(|| UserError::NoSuchGroup(group.into()))?
        .gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let nobody = resolve(Some("nobody"), None).unwrap().unwrap();
        assert_eq!(nobody.uid, 65534);
        let by_number = resolve(Some("65534"), Some("0")).unwrap().unwrap();
        assert_eq!((by_number.uid, by_number.gid), (65534, 0));
        assert!(resolve(None, None).unwrap().is_none());
    }

    #[test]
    fn the_effective_capability_mask_is_read_from_proc_status() {
        let status = "Name:\tcluster-lb\nCapInh:\t0000000000000000\nCapEff:\t000000c000001020\nCapBnd:\t000001ffffffffff\n";
        let mask = effective_capabilities(status).unwrap();
        assert_eq!(mask, (1 << 39) | (1 << 38) | (1 << 12) | (1 << 5));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let error = resolve(Some("no-such-user-xyz"), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no such user"), "{error}");
        let error = format!(
            "{:#}",
            resolve(Some("nobody"), Some("no-such-group-xyz")).unwrap_err()
        );
        assert!(error.contains("no such group"), "{error}");
        assert!(resolve(None, Some("nogroup")).is_err());
    }
}
