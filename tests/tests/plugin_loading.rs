//! Loading plugin libraries: what the host says about a file that is missing, not a
//! plugin, or built against an incompatible SDK. The incompatible plugins are built in
//! the test, out of tree, from a copy of the SDK with a changed version or interface.

use std::path::{Path, PathBuf};
use std::process::Command;

use epidemic_tests::{epidemic_bin, oot, plugin_path};

fn plugin_check(file: &Path) -> (bool, String, String) {
    let out = Command::new(epidemic_bin())
        .args(["plugin", "check"])
        .arg(file)
        .current_dir(
            file.parent()
                .filter(|p| p.is_dir())
                .unwrap_or(Path::new("/")),
        )
        .output()
        .expect("run epidemic");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One line on stderr, naming the file; non-zero exit.
fn assert_one_line_error(file: &Path, needles: &[&str]) -> String {
    let (ok, _, err) = plugin_check(file);
    assert!(!ok, "{} was accepted", file.display());
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "want one line, got:\n{err}"
    );
    assert!(err.contains(&file.display().to_string()), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
    err
}

#[test]
fn missing_file() {
    assert_one_line_error(
        Path::new("/nonexistent/libepidemic_x.so"),
        &["file not found"],
    );
}

#[test]
fn a_file_that_is_not_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("libepidemic_fake.so");
    std::fs::write(&f, "not an ELF file\n").unwrap();
    assert_one_line_error(&f, &["cannot load library"]);
}

#[test]
fn a_library_that_is_not_a_plugin() {
    // Any real shared library without Epidemic's root module: take the C library the
    // test binary itself links.
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libc.so.6");
    assert_one_line_error(&libc, &["not an Epidemic plugin"]);
}

#[test]
fn plugin_check_describes_a_handler_and_a_backend() {
    let (ok, out, err) = plugin_check(&plugin_path("recorder"));
    assert!(ok, "{err}");
    assert!(out.contains("kind:    handler"), "{out}");
    assert!(out.contains("name:    recorder"), "{out}");
    assert!(
        out.contains(&format!("sdk:     {}", epidemic_plugin_sdk::SDK_VERSION)),
        "{out}"
    );
    // Without its config the recorder cannot say what it subscribes to; it says why.
    assert!(
        out.contains("subscriptions: unknown without a valid config"),
        "{out}"
    );

    let out = Command::new(epidemic_bin())
        .args(["plugin", "check"])
        .arg(plugin_path("recorder"))
        .args([
            "--handler-config",
            r#"{"file": "/dev/null", "table": "users", "columns": ["name", "mail"]}"#,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("users (name, mail) ops: INSERT,UPDATE,DELETE"),
        "{text}"
    );

    let (ok, out, _) = plugin_check(&epidemic_tests::backend_path("sqlite"));
    assert!(ok);
    assert!(
        out.contains("kind:    backend") && out.contains("schemes: sqlite"),
        "{out}"
    );
}

/// The handler every out-of-tree build below compiles, against SDK 0.2 (`context`: the
/// `new` signature's second parameter) or SDK 0.1 (none).
fn stale_handler(sdk_02: bool) -> String {
    let (import, ctx) = if sdk_02 {
        (", Context", ", _: &Context")
    } else {
        ("", "")
    };
    format!(
        "use epidemic_plugin_sdk::{{Handler, HandlerConfig, HandlerError, Subscription{import}}};\n\
         pub struct Stale;\n\
         impl Handler for Stale {{\n\
             const NAME: &'static str = \"stale\";\n\
             fn new(_: &HandlerConfig{ctx}) -> Result<Self, HandlerError> {{ Ok(Stale) }}\n\
             fn subscriptions(&self) -> Vec<Subscription> {{ vec![Subscription::new(\"t\", [\"a\"])] }}\n\
         }}\n\
         epidemic_plugin_sdk::export_handler!(Stale);\n"
    )
}

/// A workspace in `work` with the SDK in `work/sdk` (and the ABI crate in `work/abi` when
/// given) and a plugin `name` using it; build it and return the library's path.
fn build_plugin(name: &str, work: &Path, with_abi: bool, source: &str) -> PathBuf {
    let plugin = work.join("plugin");
    std::fs::create_dir_all(plugin.join("src")).unwrap();
    std::fs::write(
        plugin.join("Cargo.toml"),
        format!(
            "[package]\nname = \"epidemic-{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nepidemic-plugin-sdk = {{ path = \"../sdk\" }}\n"
        ),
    )
    .unwrap();
    std::fs::write(plugin.join("src/lib.rs"), source).unwrap();
    let members = if with_abi {
        "\"abi\", \"sdk\", \"plugin\""
    } else {
        "\"sdk\", \"plugin\""
    };
    std::fs::write(
        work.join("Cargo.toml"),
        format!("[workspace]\nresolver = \"2\"\nmembers = [{members}]\n"),
    )
    .unwrap();
    oot::cargo_build(work).join(format!("libepidemic_{}.so", name.replace('-', "_")))
}

/// Build a handler plugin against a modified copy of the SDK and its ABI crate, out of
/// this workspace. `edit` changes the copies (`work/sdk`, `work/abi`); `abi_version` is
/// the ABI crate's version, which is what a library reports.
fn build_against_modified_sdk(name: &str, abi_version: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let root = oot::repo_root();
    let work = oot::work_dir(name);
    let (sdk, abi) = (work.join("sdk"), work.join("abi"));
    oot::copy_dir(&root.join("plugin-sdk/src"), &sdk.join("src"));
    oot::copy_dir(&root.join("plugin-sdk/abi/src"), &abi.join("src"));
    std::fs::write(
        abi.join("Cargo.toml"),
        format!(
            "[package]\nname = \"epidemic-plugin-abi\"\nversion = \"{abi_version}\"\nedition = \"2021\"\n\n\
             [lib]\nname = \"epidemic_plugin_abi\"\n\n[dependencies]\n{}",
            workspace_deps(&root, &["abi_stable"])
        ),
    )
    .unwrap();
    std::fs::write(
        sdk.join("Cargo.toml"),
        format!(
            "[package]\nname = \"epidemic-plugin-sdk\"\nversion = \"{}\"\nedition = \"2021\"\n\n\
             [lib]\nname = \"epidemic_plugin_sdk\"\n\n[dependencies]\n\
             epidemic-plugin-abi = {{ path = \"../abi\" }}\n{}",
            epidemic_plugin_sdk::SDK_VERSION,
            workspace_deps(
                &root,
                &["abi_stable", "serde", "serde_json", "thiserror", "tracing"]
            )
        ),
    )
    .unwrap();
    edit(&work);
    build_plugin(name, &work, true, &stale_handler(true))
}

/// Replace `from` by `to` once in `file`, asserting the text is still there.
fn edit_file(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let changed = text.replacen(from, to, 1);
    assert_ne!(
        changed,
        text,
        "{} no longer holds {from:?}: update this test",
        file.display()
    );
    std::fs::write(file, changed).unwrap();
}

/// `name = "version"` lines for dependencies, copied from the workspace's
/// `[workspace.dependencies]` so the copy builds with the same crates.
fn workspace_deps(root: &Path, names: &[&str]) -> String {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    names
        .iter()
        .map(|n| {
            text.lines()
                .find(|l| l.starts_with(&format!("{n} =")))
                .unwrap_or_else(|| panic!("{n} not in workspace dependencies"))
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn a_plugin_built_against_sdk_0_1_is_refused_naming_both_versions() {
    // The 0.1 SDK exactly as released (tests/fixtures/sdk-0.1), and a handler written
    // for it: what a third party built before 0.2.
    let root = oot::repo_root();
    let work = oot::work_dir("sdk-0-1");
    let sdk = work.join("sdk");
    oot::copy_dir(&root.join("tests/fixtures/sdk-0.1/src"), &sdk.join("src"));
    std::fs::write(
        sdk.join("Cargo.toml"),
        format!(
            "[package]\nname = \"epidemic-plugin-sdk\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\nname = \"epidemic_plugin_sdk\"\n\n[dependencies]\n{}",
            workspace_deps(&root, &["abi_stable", "serde", "serde_json", "thiserror"])
        ),
    )
    .unwrap();
    let lib = build_plugin("sdk-0-1", &work, false, &stale_handler(false));
    let err = assert_one_line_error(
        &lib,
        &[
            "epidemic-plugin-sdk 0.1.0",
            epidemic_plugin_sdk::abi::ABI_VERSION,
            "rebuild the plugin against epidemic-plugin-sdk 0.2",
        ],
    );
    assert!(!err.contains("Layout"), "layout dump leaked: {err}");
}

#[test]
fn a_plugin_built_against_a_newer_abi_series_is_refused() {
    let lib = build_against_modified_sdk("abi-next", "0.3.0", |_| {});
    let err = assert_one_line_error(
        &lib,
        &[
            "0.3.0",
            epidemic_plugin_sdk::abi::ABI_VERSION,
            "rebuild the plugin",
        ],
    );
    assert!(!err.contains("Layout"), "layout dump leaked: {err}");
}

#[test]
fn a_plugin_built_against_a_changed_interface_is_refused() {
    // Same version number, but a change's layout moved (a field inserted before the
    // others): abi_stable's layout check must catch it, and the host must summarise its
    // long report in one line.
    let lib = build_against_modified_sdk(
        "abi-changed",
        epidemic_plugin_sdk::abi::ABI_VERSION,
        |work| {
            edit_file(
                &work.join("abi/src/lib.rs"),
                "pub struct RChange {\n    pub id: i64,",
                "pub struct RChange {\n    pub shard: i64,\n    pub id: i64,",
            );
            // Every place the SDK builds a change (borrowed and owned conversions).
            let boundary = work.join("sdk/src/boundary.rs");
            let text = std::fs::read_to_string(&boundary).unwrap();
            let from = "        RChange {\n            id: c.id,";
            assert!(
                text.contains(from),
                "{} changed: update this test",
                boundary.display()
            );
            std::fs::write(
                &boundary,
                text.replace(
                    from,
                    "        RChange {\n            shard: 0,\n            id: c.id,",
                ),
            )
            .unwrap();
        },
    );
    let err = assert_one_line_error(&lib, &["SDK interface differs", "rebuild the plugin"]);
    assert!(err.len() < 400, "error too long: {err}");
    // The full report is there for those who ask.
    let out = Command::new(epidemic_bin())
        .args(["--verbose", "plugin", "check"])
        .arg(&lib)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).lines().count() > 5);
}

#[test]
fn a_plugin_from_a_later_0_2_release_that_grew_the_interface_loads_and_runs() {
    // What a 0.2.x release may add: a handler method after the last one, a root-module
    // field after the last one. A host of 0.2.0 must still load such a plugin and call
    // what it knows.
    let lib = build_against_modified_sdk("abi-grown", "0.2.9", |work| {
        let abi = work.join("abi/src/lib.rs");
        edit_file(
            &abi,
            "    fn snapshot(&mut self, event: &RSnapshotEvent) -> RResult<(), RError>;\n",
            "    fn snapshot(&mut self, event: &RSnapshotEvent) -> RResult<(), RError>;\n\n    \
             fn flush(&mut self) -> RResult<(), RError>;\n",
        );
        edit_file(
            &abi,
            "    ) -> RResult<BackendBox, RError>,\n}",
            "    ) -> RResult<BackendBox, RError>,\n    pub homepage: RStr<'static>,\n}",
        );
        let sdk = work.join("sdk/src");
        edit_file(
            &sdk.join("handler.rs"),
            "    fn handle_batch(&mut self, changes: RSlice<'_, RChange>) -> RResult<(), RBatchError> {",
            "    fn flush(&mut self) -> RResult<(), RError> {\n        RResult::ROk(())\n    }\n\n    \
             fn handle_batch(&mut self, changes: RSlice<'_, RChange>) -> RResult<(), RBatchError> {",
        );
        let lib = sdk.join("lib.rs");
        for _ in 0..2 {
            edit_file(
                &lib,
                "        }\n        .leak_into_prefix()",
                "            homepage: RStr::from_str(\"\"),\n        }\n        .leak_into_prefix_",
            );
        }
        let text = std::fs::read_to_string(&lib).unwrap();
        std::fs::write(
            &lib,
            text.replace(".leak_into_prefix_", ".leak_into_prefix()"),
        )
        .unwrap();
    });
    let (ok, out, err) = plugin_check(&lib);
    assert!(ok, "a grown 0.2.x plugin was refused: {err}");
    assert!(out.contains("t (a) ops: INSERT,UPDATE,DELETE"), "{out}");
}
