//! Every seed of the fuzz corpus and every input a fuzzer crashed on (`fuzz/corpus/TARGET`,
//! `fuzz/regressions/TARGET`) through the same code as the fuzz targets: a fixed crash stays
//! fixed, and this runs on stable in CI.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("{}", path.display());
            run(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_inputs_do_not_crash() {
    use reflex::fuzzing;
    type Run = fn(&[u8]);
    let targets: [(&str, Run); 5] = [
        ("config", fuzzing::config),
        ("cloudevents", fuzzing::cloudevents),
        ("webhook", fuzzing::webhook),
        ("soap", fuzzing::soap),
        ("syslog", fuzzing::syslog),
    ];
    for (name, run) in targets {
        assert!(replay(name, run) > 0, "no seeds for the {name} target");
    }
}
