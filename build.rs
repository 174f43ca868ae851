//! Embeds the numbered migrations of `sql/` (`NNNN_name.sql`) into the binary.

use std::fmt::Write;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=sql");
    // Read at run time: `env!` would bake in the path of whichever checkout
    // first built this script, and a target directory shared with another
    // checkout would then read that checkout's migrations.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("sql");
    let mut files: Vec<(u32, String)> = std::fs::read_dir(&dir)
        .expect("sql/ exists")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let (number, rest) = name.split_once('_')?;
            if !rest.ends_with(".sql") || number.len() != 4 {
                return None;
            }
            Some((number.parse().ok()?, name))
        })
        .collect();
    files.sort();
    for pair in files.windows(2) {
        assert!(
            pair[0].0 != pair[1].0,
            "two migrations numbered {}",
            pair[0].0
        );
    }
    let mut out = String::from("&[\n");
    for (version, name) in &files {
        let path = dir.join(name);
        writeln!(
            out,
            "    ({version}, {name:?}, include_str!({:?})),",
            path.display()
        )
        .unwrap();
    }
    out.push(']');
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(dest, out).unwrap();
}
