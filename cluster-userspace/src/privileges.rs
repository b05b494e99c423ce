//! `--user` / `--group`: whom the workers run as. Resolved once in the primary, applied in each
//! forked child before exec (see `spawn`).

use std::ffi::CString;

use anyhow::{bail, Context, Result};
use nix::unistd::{getgrouplist, Gid, Group, User};

use crate::spawn::Credentials;

/// Looks up `user` (name or uid) and `group` (name or gid; default: the user's primary group).
/// The supplementary groups are the user's, as `initgroups` would set them.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>> {
    let Some(user) = user else {
        if group.is_some() {
            bail!("--group needs --user");
        }
        return Ok(None);
    };
    let account = lookup_user(user)?;
    let gid = match group {
        Some(group) => lookup_group(group)?,
        None => account.gid,
    };
    let name = CString::new(account.name.as_bytes()).context("user name contains NUL")?;
    let mut groups: Vec<libc::gid_t> = getgrouplist(&name, gid)
        .with_context(|| format!("reading the groups of user {}", account.name))?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(Some(Credentials {
        uid: account.uid.as_raw(),
        gid: gid.as_raw(),
        groups,
    }))
}

fn lookup_user(user: &str) -> Result<User> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()),
        Err(_) => User::from_name(user),
    };
    found
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| format!("--user {user}: no such user on this system"))
}

fn lookup_group(group: &str) -> Result<Gid> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    Ok(Group::from_name(group)
        .with_context(|| format!("looking up group {group}"))?
        .with_context(|| format!("--group {group}: no such group on this system"))?
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
