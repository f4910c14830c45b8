//! Network namespace, veth, cgroup and process guards for end-to-end tests.
