//! The VM suite's scenario names, in the order `natt-vm` runs them. `natt-vm` runs exactly
//! these (it checks its own list against this one), and `cargo xtask vm-test` counts and
//! selects by them; xtask includes this file by path, so it stays free of the test crate's
//! dependencies. docs/vm-tests.md says what each one proves.

/// Every scenario.
pub const NAMES: [&str; 35] = [
    "a-clean",
    "b-observe-null",
    "b-observe-cbc-aes",
    "b-enforce-cbc-aes",
    "c-enforce",
    "d-nat-learned",
    "e-plain-esp",
    "f-strongswan-nat",
    "h-ipv6-enforce",
    "i-two-behind-one-nat",
    "j-sigkill-restart",
    "k-ten-thousand-sas",
    "l-constant-delta-enforce",
    "l-constant-delta-observe",
    "l-constant-delta-2-enforce",
    "l-constant-delta-7-observe",
    "l-constant-delta-100-enforce",
    "l-constant-delta-100-observe",
    "m-first-segment-nat",
    "m-first-segment-observe",
    "m-first-segment-plain-observe",
    "m-first-segment",
    "n-bit-flip-enforce",
    "n-bit-flip-observe",
    "n-random-bit-flip-observe",
    "n-zeroed-run-observe",
    "o-rekey-enforce",
    "o-rekey-observe",
    "p-sighup-enforce",
    "q-undiscovered-netns",
    "r-lru-evicted-enforce",
    "s-nat-rebind-enforce",
    "t-learning-flood-observe",
    "u-soak-enforce",
    "g-gro",
];

/// The systemd guest's one scenario (`cargo xtask vm-test` boots it on the oldest and the
/// newest kernel, apart from the others): the .deb installed and operated under systemd.
pub const SYSTEMD: &str = "v-systemd";

/// Checks `--only` names against the list (and `SYSTEMD`): an unknown name is an error naming
/// it and the scenarios that exist.
///
/// # Errors
/// The first unknown name.
pub fn check_selection(only: &[String]) -> Result<(), String> {
    match only
        .iter()
        .find(|n| !NAMES.contains(&n.as_str()) && *n != SYSTEMD)
    {
        Some(bad) => Err(format!(
            "no VM scenario named `{bad}`; the scenarios are: {}, {SYSTEMD}",
            NAMES.join(", ")
        )),
        None => Ok(()),
    }
}
