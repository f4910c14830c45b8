//! The kernel verifier accepts the program.
use natt_monitor::ebpf::Verifier;

#[test]
fn verifier_program_loads() {
    match Verifier::load() {
        Ok(_) => {}
        Err(e) => {
            let mut s = format!("{e}");
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s += &format!("\ncaused by: {x}");
                src = x.source();
            }
            let lines: Vec<&str> = s.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            panic!("load failed:\n{tail}");
        }
    }
}
