//! User-namespace detection.

/// True when this process runs in a user namespace (its uid map is not the full identity map),
/// as under rootless Docker or Podman. Overlay then needs `userxattr` and `user.` markers.
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(m) => is_partial_map(&m),
        Err(_) => false,
    }
}

fn is_partial_map(uid_map: &str) -> bool {
    let f: Vec<&str> = uid_map.split_whitespace().collect();
    f != ["0", "0", "4294967295"]
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_map_is_the_initial_namespace() {
        assert!(!super::is_partial_map("         0          0 4294967295\n"));
        assert!(super::is_partial_map("         0       1000          1\n"));
    }
}
