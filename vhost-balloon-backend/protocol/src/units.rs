//! Sizes: the virtio-balloon page is 4 KiB whatever the guest's or host's page size
//! (VIRTIO_BALLOON_PFN_SHIFT = 12). Every conversion between pages and bytes goes through here.

/// Bytes per balloon page.
pub const PAGE_SIZE: u64 = 4096;

pub fn pages_to_bytes(pages: u64) -> u64 {
    pages.saturating_mul(PAGE_SIZE)
}

/// Whole pages in `bytes`, rounded down (a target never asks for a partial page).
pub fn bytes_to_pages(bytes: u64) -> u64 {
    bytes / PAGE_SIZE
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason} (examples: 4096, 512M, 1.5G, 2GiB)")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses a byte size with an optional binary suffix: `4096`, `64K`, `512M`, `512MiB`, `1.5G`,
/// `2T`. Suffixes are powers of 1024, as operators of QEMU (`-m 512M`) expect.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err("no number"));
    }
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err("unknown suffix")),
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(1u64 << shift)
            .ok_or_else(|| err("too large"));
    }
    let value: f64 = number.parse().map_err(|_| err("not a number"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(bytes as u64)
}

/// A size in bytes, as config files and command lines write it: a number or a string with a
/// suffix ("512M", "1.5G"). It is written back as a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = SizeError;
    fn from_str(input: &str) -> Result<Self, SizeError> {
        parse_size(input).map(Size)
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Size(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        for (input, bytes) in [
            ("4096", 4096),
            ("64K", 64 << 10),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("1.5G", 3 << 29),
            ("2g", 2 << 30),
            (" 1T ", 1 << 40),
        ] {
            assert_eq!(parse_size(input), Ok(bytes), "{input}");
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        for input in [
            "",
            "M",
            "12X",
            "1.2.3G",
            "99999999999999999999",
            "-1M",
            "20000000T",
        ] {
            assert!(parse_size(input).is_err(), "{input}");
        }
    }

    #[test]
    fn sizes_read_as_numbers_or_strings_and_write_as_numbers() {
        #[derive(Debug, serde::Deserialize, serde::Serialize)]
        struct Wrap {
            size: Size,
        }
        let read = |text: &str| toml::from_str::<Wrap>(text).map(|w| w.size.0);
        assert_eq!(read("size = \"512M\"").unwrap(), 512 << 20);
        assert_eq!(read("size = 4096").unwrap(), 4096);
        assert!(read("size = \"12Q\"").is_err());
        assert!(read("size = -1").is_err());
        let written = toml::to_string(&Wrap {
            size: Size(1 << 30),
        })
        .unwrap();
        assert_eq!(written.trim(), "size = 1073741824");
    }

    #[test]
    fn pages_and_bytes() {
        assert_eq!(pages_to_bytes(3), 12288);
        assert_eq!(bytes_to_pages(12289), 3);
        assert_eq!(pages_to_bytes(u64::MAX), u64::MAX);
    }
}
