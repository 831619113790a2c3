//! What the worker reports about the machine it runs on.

use std::path::Path;

const MEMINFO: &str = "/proc/meminfo";

/// Memory available to new allocations without swapping, in bytes (the kernel's `MemAvailable`);
/// 0 where it cannot be read (not Linux, or an unexpected format). Reading a `/proc` file never
/// waits on a disk, so this is fine to call from async code.
pub(crate) fn memory_available_bytes() -> u64 {
    read_mem_available(Path::new(MEMINFO)).unwrap_or(0)
}

fn read_mem_available(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_mem_available(&text)
}

/// The `MemAvailable:` line of `/proc/meminfo` (`MemAvailable:   123456 kB`) in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let rest = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?;
    let mut fields = rest.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match (fields.next(), fields.next()) {
        (Some("kB"), None) => value.checked_mul(1024),
        (None, None) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let meminfo = "MemTotal:       16314800 kB\n\
                       MemFree:         1234567 kB\n\
                       MemAvailable:    8123456 kB\n\
                       Buffers:          345678 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(8_123_456 * 1024));
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for meminfo in [
            "",
            "MemTotal: 16314800 kB\n",
            "MemAvailable: lots kB\n",
            "MemAvailable: 12 MB\n",
            "MemAvailable: 12 kB extra\n",
            "MemAvailable: 18446744073709551615 kB\n",
        ] {
            assert_eq!(parse_mem_available(meminfo), None, "{meminfo:?}");
        }
        assert_eq!(parse_mem_available("MemAvailable: 42\n"), Some(42));
    }

    #[test]
    fn a_missing_file_reads_as_nothing() {
        assert_eq!(read_mem_available(Path::new("/nonexistent/meminfo")), None);
    }
}
