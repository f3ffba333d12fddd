//! Unit tests of the layer format: round trip through export/import, hostile tars refused with
//! nothing written outside the layer, names, tags and manifests.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::layer::{export_layer, import_from, import_layer, split_path, MEDIA_TAR};
use super::*;

/// A raw tar entry, written byte by byte so hostile names get through (the tar crate refuses
/// to write `..` or absolute names).
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_old();
    {
        let o = h.as_old_mut();
        o.name[..name.len()].copy_from_slice(name);
        o.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_mtime(1);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    t.extend_from_slice(&[0u8; 1024]);
    t
}

/// Unpacks `tar` into `<tmp>/layer` and returns the result; `<tmp>` also holds a sentinel dir
/// that must stay empty.
fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<layer::ImportStats>) {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("layer")).unwrap();
    fs::create_dir(tmp.path().join("outside")).unwrap();
    let r = import_from(
        std::io::BufReader::new(tar),
        MEDIA_TAR,
        &tmp.path().join("layer"),
        XattrNs::User,
    );
    (tmp, r)
}

fn names_under(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn assert_contained(tmp: &tempfile::TempDir) {
    assert_eq!(names_under(tmp.path()), ["layer", "outside"]);
    assert!(names_under(&tmp.path().join("outside")).is_empty());
}

#[test]
fn refuses_dotdot_absolute_and_device_entries() {
    for (name, kind, link) in [
        (&b"../outside/evil"[..], b'0', &b""[..]),
        (b"a/../../outside/evil", b'0', b""),
        (b"/tmp/evil-abs", b'0', b""),
        (b"dev", b'3', b""),
        (b"blk", b'4', b""),
        (b"hl", b'1', b"../outside/x"),
        (b"hl2", b'1', b"/etc/passwd"),
        (b"hl3", b'1', b"not-there"),
    ] {
        let mut t = Vec::new();
        raw_entry(&mut t, name, kind, link, b"x");
        let (tmp, r) = unpack(&finish(t));
        let e = r.expect_err(&String::from_utf8_lossy(name)).to_string();
        assert!(
            [
                "absolute",
                "`..`",
                "device",
                "out of the layer",
                "not an earlier entry",
                "not inside"
            ]
            .iter()
            .any(|w| e.contains(w)),
            "{e}"
        );
        assert_contained(&tmp);
        assert!(!Path::new("/tmp/evil-abs").exists());
    }
}

#[test]
fn never_writes_through_a_symlink() {
    // A symlink to the outside, then entries that would write through it.
    let mut t = Vec::new();
    raw_entry(&mut t, b"ln", b'2', b"../outside", b"");
    raw_entry(&mut t, b"ln/file", b'0', b"", b"through");
    let (tmp, r) = unpack(&finish(t));
    assert!(r.is_err(), "wrote below a symlink");
    assert_contained(&tmp);
    // A symlink where a file is then written: the symlink is replaced, its target untouched.
    let mut t = Vec::new();
    raw_entry(&mut t, b"ln", b'2', b"../outside/target", b"");
    raw_entry(&mut t, b"ln", b'0', b"", b"data");
    let (tmp, r) = unpack(&finish(t));
    r.unwrap();
    assert_contained(&tmp);
    assert_eq!(fs::read(tmp.path().join("layer/ln")).unwrap(), b"data");
}

#[test]
fn whiteouts_and_opaque_markers_become_overlay_format() {
    let mut t = Vec::new();
    raw_entry(&mut t, b"d/", b'5', b"", b"");
    raw_entry(&mut t, b"d/.wh..wh..opq", b'0', b"", b"");
    raw_entry(&mut t, b"d/.wh.gone", b'0', b"", b"");
    raw_entry(&mut t, b"d/f", b'0', b"", b"hi");
    raw_entry(&mut t, b".wh.", b'0', b"", b"");
    let (tmp, r) = unpack(&finish(t));
    assert!(r.is_err(), "a whiteout of nothing is refused");
    drop(tmp);
    let mut t = Vec::new();
    raw_entry(&mut t, b"d/", b'5', b"", b"");
    raw_entry(&mut t, b"d/.wh..wh..opq", b'0', b"", b"");
    raw_entry(&mut t, b"d/.wh.gone", b'0', b"", b"");
    raw_entry(&mut t, b"d/f", b'0', b"", b"hi");
    let (tmp, r) = unpack(&finish(t));
    r.unwrap();
    let d = tmp.path().join("layer/d");
    let m = fs::symlink_metadata(d.join("gone")).unwrap();
    assert_eq!(m.mode() & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(m.rdev(), 0);
    let v = at::XattrTarget::Fd(std::os::fd::AsRawFd::as_raw_fd(
        &fs::File::open(&d).unwrap(),
    ))
    .get(c"user.overlay.opaque")
    .unwrap();
    assert_eq!(v.as_deref(), Some(&b"y"[..]));
    assert_eq!(names_under(&d), ["f", "gone"]);
}

use cachedriver_common::at;

#[test]
fn export_import_round_trip_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/f"), b"content").unwrap();
    fs::hard_link(src.join("a/b/f"), src.join("a/g")).unwrap();
    std::os::unix::fs::symlink("b/f", src.join("a/s")).unwrap();
    at::mknodat(
        std::os::fd::AsRawFd::as_raw_fd(&fs::File::open(src.join("a")).unwrap()),
        c"wh",
        libc::S_IFCHR | 0o600,
        0,
    )
    .unwrap();
    let i1 = export_layer(&src, &tmp.path().join("1.blob")).unwrap();
    let i2 = export_layer(&src, &tmp.path().join("2.blob")).unwrap();
    assert_eq!(i1, i2, "same layer, same digest");
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let st = import_layer(
        &tmp.path().join("1.blob"),
        layer::MEDIA_ZSTD,
        &dest,
        XattrNs::User,
    )
    .unwrap();
    assert_eq!(st.diff_id, i1.diff_id);
    assert_eq!(fs::read(dest.join("a/b/f")).unwrap(), b"content");
    assert_eq!(
        fs::symlink_metadata(dest.join("a/g")).unwrap().ino(),
        fs::symlink_metadata(dest.join("a/b/f")).unwrap().ino()
    );
    assert_eq!(fs::read_link(dest.join("a/s")).unwrap(), Path::new("b/f"));
    let wh = fs::symlink_metadata(dest.join("a/wh")).unwrap();
    assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
    // Exporting the unpacked layer gives the same bytes again.
    let i3 = export_layer(&dest, &tmp.path().join("3.blob")).unwrap();
    assert_eq!(i3.diff_id, i1.diff_id);
}

#[test]
fn split_path_rules() {
    assert_eq!(split_path(b"./a/b/").unwrap(), [&b"a"[..], b"b"]);
    assert!(split_path(b"./").unwrap().is_empty());
    assert!(split_path(b"a/../b").is_err());
    assert!(split_path(b"/a").is_err());
}

#[test]
fn specs_tags_and_repos() {
    assert_eq!(parse_cache_spec("m2").unwrap().0, "m2");
    assert_eq!(parse_cache_spec("m2:default").unwrap().0, "m2");
    assert!(parse_cache_spec("m2:pr-1")
        .unwrap_err()
        .to_string()
        .contains("scopes are not supported yet"));
    assert!(parse_cache_spec("../x").is_err());
    assert_eq!(tag_for("m2", "default"), "m2.default");
    assert_eq!(tag_for(".x", "default"), "_.x.default");
    assert!(tag_for(&"a".repeat(200), "default").len() <= 128);
    assert_eq!(
        split_repo("127.0.0.1:5000/team/c:tag"),
        ("127.0.0.1:5000/team/c".to_string(), Some("tag".to_string()))
    );
    assert_eq!(
        split_repo("127.0.0.1:5000/team/c"),
        ("127.0.0.1:5000/team/c".to_string(), None)
    );
    assert!(reference("team/c", "t").is_err(), "no registry host");
}

#[test]
fn manifests_of_other_types_are_refused() {
    let m = OciImageManifest {
        config: OciDescriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            ..OciDescriptor::default()
        },
        layers: vec![OciDescriptor::default()],
        ..OciImageManifest::default()
    };
    assert!(check_manifest(&m, "r")
        .unwrap_err()
        .to_string()
        .contains("not a cachedriver snapshot"));
    let mut ok = m.clone();
    ok.artifact_type = Some(ARTIFACT_TYPE.into());
    ok.layers[0].media_type = layer::MEDIA_ZSTD.into();
    ok.layers[0].digest = "sha256:../../x".into();
    assert!(check_manifest(&ok, "r").is_err(), "bad digest refused");
}
