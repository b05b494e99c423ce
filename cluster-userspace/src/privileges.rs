//! `--user` / `--group`: whom the workers run as. Resolved once in the primary, applied in each
//! forked child before exec (see `spawn`).

use std::ffi::CString;

use nix::unistd::{getgrouplist, Gid, Group, User};

use crate::spawn::Credentials;

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
