//! Guest RAM from the VMM's memory file (QEMU `memory-backend-file,share=on`, cloud-hypervisor
//! `--memory-zone file=...,shared=on`), for a guest app that has no balloon driver beside it:
//! the vhost-user memory table only arrives when a driver starts the device, so without this
//! the app's pages could not be named.
//!
//! The file says nothing about where its bytes sit in guest-physical memory, and a wrong guess
//! would discard live guest pages, so the layout is given: one of the VMMs' own rules (from
//! their sources, below) applied to the file's size, or explicit regions. When a memory table
//! arrives too, it must describe the same file at the same offsets, or it is refused.

use super::GuestRegion;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;

/// Where the file's bytes are in guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MemoryLayout {
    /// QEMU's q35 machine (hw/i386/pc_q35.c) without `max-ram-below-4g`: RAM under 2.75 GiB
    /// sits at 0; from 2.75 GiB on, the first 2 GiB sit at 0 and the rest from 4 GiB.
    Q35,
    /// QEMU's pc (i440fx) machine (hw/i386/pc_piix.c, gigabyte-aligned, the default since
    /// QEMU 2.1) without `max-ram-below-4g`: RAM under 3.5 GiB sits at 0; from 3.5 GiB on, the
    /// first 3 GiB sit at 0 and the rest from 4 GiB.
    Pc,
    /// cloud-hypervisor on x86_64 (arch/src/x86_64/layout.rs), one memory zone: up to 3 GiB at
    /// 0 (the 32-bit device area starts there), the rest from 4 GiB.
    CloudHypervisor,
    /// Explicit regions, for any other machine or a `max-ram-below-4g`.
    Regions(Vec<LayoutRegion>),
}

/// `len` bytes of the file from `offset` are guest RAM from guest-physical address `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutRegion {
    pub gpa: u64,
    pub len: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "unknown memory layout {0:?}: q35, pc, cloud-hypervisor, or regions \
         GPA:SIZE@OFFSET,... (e.g. 0:2G@0,4G:1G@2G)"
    )]
    Unknown(String),
    #[error("memory layout region {0:?}: {1}")]
    BadRegion(String, &'static str),
    #[error("memory layout regions overlap in guest-physical memory or in the file")]
    Overlap,
    #[error(
        "the memory file holds {file} bytes, but the layout's regions end at {end} bytes into it"
    )]
    BeyondFile { file: u64, end: u64 },
    #[error("the memory file is empty or not a whole number of 4 KiB pages ({0} bytes)")]
    FileSize(u64),
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok();
    }
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl FromStr for MemoryLayout {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, LayoutError> {
        match s {
            "q35" => return Ok(MemoryLayout::Q35),
            "pc" => return Ok(MemoryLayout::Pc),
            "cloud-hypervisor" => return Ok(MemoryLayout::CloudHypervisor),
            _ => {}
        }
        if !s.contains(':') {
            return Err(LayoutError::Unknown(s.to_string()));
        }
        let mut regions = Vec::new();
        for part in s.split(',') {
            let bad = |why| LayoutError::BadRegion(part.to_string(), why);
            let (gpa, rest) = part.split_once(':').ok_or(bad("want GPA:SIZE@OFFSET"))?;
            let (len, offset) = rest.split_once('@').ok_or(bad("want GPA:SIZE@OFFSET"))?;
            let region = LayoutRegion {
                gpa: parse_size(gpa).ok_or(bad("bad guest-physical address"))?,
                len: parse_size(len).ok_or(bad("bad size"))?,
                offset: parse_size(offset).ok_or(bad("bad file offset"))?,
            };
            let page = balloon_protocol::PAGE_SIZE;
            if region.len == 0 || !(region.gpa | region.len | region.offset).is_multiple_of(page) {
                return Err(bad(
                    "address, size and offset must be whole 4 KiB pages, size > 0",
                ));
            }
            if region.gpa.checked_add(region.len).is_none()
                || region.offset.checked_add(region.len).is_none()
            {
                return Err(bad("beyond 64-bit addresses"));
            }
            regions.push(region);
        }
        let overlaps = |key: fn(&LayoutRegion) -> u64| {
            let mut sorted = regions.clone();
            sorted.sort_by_key(key);
            sorted
                .windows(2)
                .any(|w| key(&w[0]) + w[0].len > key(&w[1]))
        };
        if overlaps(|r| r.gpa) || overlaps(|r| r.offset) {
            return Err(LayoutError::Overlap);
        }
        Ok(MemoryLayout::Regions(regions))
    }
}

impl fmt::Display for MemoryLayout {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            MemoryLayout::Q35 => f.write_str("q35"),
            MemoryLayout::Pc => f.write_str("pc"),
            MemoryLayout::CloudHypervisor => f.write_str("cloud-hypervisor"),
            MemoryLayout::Regions(regions) => {
                let parts: Vec<String> = regions
                    .iter()
                    .map(|r| format!("{:#x}:{:#x}@{:#x}", r.gpa, r.len, r.offset))
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl TryFrom<String> for MemoryLayout {
    type Error = LayoutError;
    fn try_from(s: String) -> Result<Self, LayoutError> {
        s.parse()
    }
}

impl From<MemoryLayout> for String {
    fn from(layout: MemoryLayout) -> String {
        layout.to_string()
    }
}

/// RAM below 4 GiB up to `split` when all of it does not fit under `fits_below`; the rest
/// from 4 GiB, contiguous in the file.
fn split_below_4g(ram: u64, fits_below: u64, split: u64) -> Vec<LayoutRegion> {
    if ram < fits_below {
        return vec![LayoutRegion {
            gpa: 0,
            len: ram,
            offset: 0,
        }];
    }
    vec![
        LayoutRegion {
            gpa: 0,
            len: split,
            offset: 0,
        },
        LayoutRegion {
            gpa: FOUR_GIB,
            len: ram - split,
            offset: split,
        },
    ]
}

impl MemoryLayout {
    /// The regions for a file of `file_size` bytes.
    pub fn regions(&self, file_size: u64) -> Result<Vec<LayoutRegion>, LayoutError> {
        if file_size == 0 || !file_size.is_multiple_of(balloon_protocol::PAGE_SIZE) {
            return Err(LayoutError::FileSize(file_size));
        }
        let regions = match self {
            MemoryLayout::Q35 => split_below_4g(file_size, 0xb000_0000, 2 * GIB),
            MemoryLayout::Pc => split_below_4g(file_size, 0xe000_0000, 3 * GIB),
            // cloud-hypervisor fills the low range up to its end, then goes on at 4 GiB.
            MemoryLayout::CloudHypervisor => split_below_4g(file_size, 3 * GIB + 1, 3 * GIB),
            MemoryLayout::Regions(regions) => regions.clone(),
        };
        let end = regions.iter().map(|r| r.offset + r.len).max().unwrap_or(0);
        if end > file_size {
            return Err(LayoutError::BeyondFile {
                file: file_size,
                end,
            });
        }
        Ok(regions)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("guest memory file {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("guest memory file {path}: {error}")]
    Layout { path: PathBuf, error: LayoutError },
    #[error("guest memory file {path}: mapping it: {error}")]
    Map { path: PathBuf, error: String },
    #[error(
        "the memory table disagrees with --guest-memory-file {path} and its layout: {why} \
         (refused; give the file and layout the VMM really uses)"
    )]
    TableDisagrees { path: PathBuf, why: String },
}

/// The memory file as the backend holds it, known by its inode and size so that a VMM that
/// recreated or resized it (a new guest) is noticed. It is not mapped: the app's pages are
/// only ever named and discarded (a hole punched in the file), never read.
struct HeldFile {
    dev: u64,
    ino: u64,
    len: u64,
    regions: Vec<LayoutRegion>,
}

/// Opens a guest memory file read-write, non-blocking (a FIFO put in its place cannot hang the
/// open) and without following a symlink at its last component, which a user who can write its
/// directory could plant; except in /proc, whose links (`/proc/PID/fd/N`, how a VMM's memfd is
/// named) the kernel makes and no user can plant. The last component is opened relative to the
/// directory checked, so the directory cannot be swapped in between.
fn open_guest_memory(path: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let dir = rustix::fs::open(
        parent,
        OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::RDONLY,
        Mode::empty(),
    )?;
    let in_proc = rustix::fs::fstatfs(&dir)?.f_type == rustix::fs::PROC_SUPER_MAGIC;
    let mut flags = OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC;
    if !in_proc {
        flags |= OFlags::NOFOLLOW;
    }
    let file = std::fs::File::from(rustix::fs::openat(&dir, name, flags, Mode::empty())?);
    // Guest RAM in a file any user may write is no guest's (a VMM's files are its user's, 0600
    // or 0660). A memfd's mode is 0777, but it is reached only through /proc, which guards it.
    if !in_proc && file.metadata()?.mode() & 0o002 != 0 {
        return Err(std::io::Error::other(
            "writable by every user (mode o+w): not a VMM's guest memory",
        ));
    }
    Ok(file)
}

/// The guest memory file given on the command line: opened when first needed (the VMM
/// creates it, possibly after the backend starts) and reopened when the VMM replaced it.
pub struct MemoryFile {
    path: PathBuf,
    layout: MemoryLayout,
    /// Guest RAM when the file is larger (QEMU uses the first `size=` bytes); else the file's.
    ram_bytes: Option<u64>,
    held: Option<HeldFile>,
}

impl MemoryFile {
    pub fn new(path: PathBuf, layout: MemoryLayout, ram_bytes: Option<u64>) -> Self {
        MemoryFile {
            path,
            layout,
            ram_bytes,
            held: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (or reopens, when the VMM replaced or resized the file) the file. Returns the
    /// regions when they are new, None when the file held is still the VMM's. File I/O (a stat,
    /// an open): never call it under the device lock.
    pub fn refresh(&mut self) -> Result<Option<Vec<GuestRegion>>, MemoryFileError> {
        let open_error = |error| MemoryFileError::Open {
            path: self.path.clone(),
            error,
        };
        let meta = std::fs::metadata(&self.path).map_err(open_error)?;
        if let Some(held) = &self.held {
            if (held.dev, held.ino, held.len) == (meta.dev(), meta.ino(), meta.len()) {
                return Ok(None);
            }
        }
        // What was opened is checked, not the path (which may change in between).
        let file = open_guest_memory(&self.path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        if !meta.is_file() {
            return Err(open_error(std::io::Error::other("not a regular file")));
        }

        let layout_error = |error| MemoryFileError::Layout {
            path: self.path.clone(),
            error,
        };
        let ram = match self.ram_bytes {
            Some(ram) if ram > meta.len() => {
                return Err(layout_error(LayoutError::BeyondFile {
                    file: meta.len(),
                    end: ram,
                }))
            }
            Some(ram) => ram,
            None => meta.len(),
        };
        let mut regions = self.layout.regions(ram).map_err(layout_error)?;
        if let Some(end) = regions.iter().map(|r| r.offset + r.len).max() {
            if end > meta.len() {
                return Err(layout_error(LayoutError::BeyondFile {
                    file: meta.len(),
                    end,
                }));
            }
        }
        regions.sort_by_key(|r| r.gpa);
        let file = Arc::new(file);
        let page = super::discard::host_page_size(Some(&file));
        let guest_regions = regions
            .iter()
            .map(|r| {
                GuestRegion::new(
                    r.gpa,
                    r.len,
                    // No mapping: discards punch holes in the file (tmpfs, hugetlbfs and
                    // most disk filesystems can), never MADV_REMOVE.
                    super::Backing {
                        host_addr: 0,
                        file: Some((file.clone(), r.offset)),
                    },
                    page,
                )
            })
            .collect();
        log::info!(
            "guest memory file {}: {} MiB of guest RAM, layout {}",
            self.path.display(),
            ram >> 20,
            self.layout
        );
        self.held = Some(HeldFile {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            regions,
        });
        Ok(Some(guest_regions))
    }

    /// Whether a memory table describes the file held: every table region lies in one of the
    /// layout's regions, backed by the same file at the matching offset.
    pub fn check_table(&self, table: &[GuestRegion]) -> Result<(), MemoryFileError> {
        let disagrees = |why: String| MemoryFileError::TableDisagrees {
            path: self.path.clone(),
            why,
        };
        let Some(held) = &self.held else {
            return Err(disagrees("the file could not be opened".into()));
        };
        for t in table {
            let Some((file, table_offset)) = &t.backing.file else {
                return Err(disagrees(format!(
                    "the table's region at gpa {:#x} has no file",
                    t.gpa
                )));
            };
            let meta = file
                .metadata()
                .map_err(|e| disagrees(format!("fstat of the table's file: {e}")))?;
            if meta.dev() != held.dev || meta.ino() != held.ino {
                return Err(disagrees(format!(
                    "the table's region at gpa {:#x} is backed by another file",
                    t.gpa
                )));
            }
            let Some(f) = held
                .regions
                .iter()
                .find(|f| f.gpa <= t.gpa && t.gpa + t.len <= f.gpa + f.len)
            else {
                return Err(disagrees(format!(
                    "the table's region at gpa {:#x} ({} MiB) is not inside the layout's regions",
                    t.gpa,
                    t.len >> 20
                )));
            };
            let expected = f.offset + (t.gpa - f.gpa);
            if expected != *table_offset {
                return Err(disagrees(format!(
                    "the table maps gpa {:#x} to file offset {table_offset:#x}, the layout to {expected:#x}",
                    t.gpa
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, len: u64, offset: u64) -> LayoutRegion {
        LayoutRegion { gpa, len, offset }
    }

    #[test]
    fn q35_keeps_small_guests_below_4g_and_splits_large_ones_at_2g() {
        let q35 = MemoryLayout::Q35;
        assert_eq!(q35.regions(GIB).unwrap(), vec![region(0, GIB, 0)]);
        let just_under = 0xb000_0000 - 4096;
        assert_eq!(
            q35.regions(just_under).unwrap(),
            vec![region(0, just_under, 0)]
        );
        assert_eq!(
            q35.regions(0xb000_0000).unwrap(),
            vec![
                region(0, 2 * GIB, 0),
                region(FOUR_GIB, 0xb000_0000 - 2 * GIB, 2 * GIB)
            ]
        );
        assert_eq!(
            q35.regions(8 * GIB).unwrap(),
            vec![region(0, 2 * GIB, 0), region(FOUR_GIB, 6 * GIB, 2 * GIB)]
        );
    }

    #[test]
    fn pc_splits_at_3g_from_3_5g_on_and_cloud_hypervisor_fills_3g_first() {
        assert_eq!(
            MemoryLayout::Pc.regions(3 * GIB).unwrap(),
            vec![region(0, 3 * GIB, 0)]
        );
        assert_eq!(
            MemoryLayout::Pc.regions(4 * GIB).unwrap(),
            vec![region(0, 3 * GIB, 0), region(FOUR_GIB, GIB, 3 * GIB)]
        );
        let ch = MemoryLayout::CloudHypervisor;
        assert_eq!(ch.regions(3 * GIB).unwrap(), vec![region(0, 3 * GIB, 0)]);
        assert_eq!(
            ch.regions(5 * GIB).unwrap(),
            vec![region(0, 3 * GIB, 0), region(FOUR_GIB, 2 * GIB, 3 * GIB)]
        );
    }

    #[test]
    fn explicit_regions_parse_and_are_checked() {
        let layout: MemoryLayout = "0:2G@0,4G:1G@2G".parse().unwrap();
        assert_eq!(
            layout.regions(3 * GIB).unwrap(),
            vec![region(0, 2 * GIB, 0), region(FOUR_GIB, GIB, 2 * GIB)]
        );
        // The display form parses back to the same layout.
        assert_eq!(layout.to_string().parse::<MemoryLayout>().unwrap(), layout);
        assert_eq!(
            layout.regions(2 * GIB),
            Err(LayoutError::BeyondFile {
                file: 2 * GIB,
                end: 3 * GIB
            })
        );
        assert_eq!(
            "0:2G@0,1G:1G@2G".parse::<MemoryLayout>(),
            Err(LayoutError::Overlap)
        );
        assert_eq!(
            "0:2G@0,4G:1G@1G".parse::<MemoryLayout>(),
            Err(LayoutError::Overlap)
        );
        assert!(matches!(
            "0:1000@0".parse::<MemoryLayout>(),
            Err(LayoutError::BadRegion(..))
        ));
        assert!(matches!(
            "q36".parse::<MemoryLayout>(),
            Err(LayoutError::Unknown(..))
        ));
        assert_eq!(MemoryLayout::Q35.regions(0), Err(LayoutError::FileSize(0)));
    }

    fn ram_file(dir: &Path, size: u64) -> PathBuf {
        let path = dir.join("guest-ram");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn the_file_is_read_by_its_layout_and_taken_again_only_when_replaced_or_resized() {
        let dir = tempfile::tempdir().unwrap();
        let path = ram_file(dir.path(), 64 << 20);
        let mut file = MemoryFile::new(path.clone(), MemoryLayout::Q35, None);
        let regions = file.refresh().unwrap().expect("first open");
        assert_eq!(regions.len(), 1);
        assert_eq!((regions[0].gpa, regions[0].len), (0, 64 << 20));
        assert!(file.refresh().unwrap().is_none(), "same file: nothing new");
        // The VMM recreated the file (a new guest): a new inode is a new mapping.
        std::fs::remove_file(&path).unwrap();
        ram_file(dir.path(), 32 << 20);
        let regions = file
            .refresh()
            .unwrap()
            .expect("a replaced file is reopened");
        assert_eq!(regions[0].len, 32 << 20);
        // Resized in place (QEMU keeps a mem-path file and grows it for a larger -m).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(48 << 20)
            .unwrap();
        let regions = file
            .refresh()
            .unwrap()
            .expect("a resized file is taken again");
        assert_eq!(regions[0].len, 48 << 20);
        // Regions are not mapped: discards can only punch holes in the file.
        assert_eq!(regions[0].backing.host_addr, 0);
    }

    #[test]
    fn a_given_ram_size_reads_the_start_of_a_larger_file_and_never_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = ram_file(dir.path(), 64 << 20);
        let mut file = MemoryFile::new(path.clone(), MemoryLayout::Q35, Some(16 << 20));
        let regions = file.refresh().unwrap().unwrap();
        assert_eq!((regions[0].gpa, regions[0].len), (0, 16 << 20));
        let mut too_big = MemoryFile::new(path, MemoryLayout::Q35, Some(128 << 20));
        assert!(matches!(
            too_big.refresh(),
            Err(MemoryFileError::Layout {
                error: LayoutError::BeyondFile { .. },
                ..
            })
        ));
    }

    #[test]
    fn only_a_regular_file_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = MemoryFile::new(dir.path().to_path_buf(), MemoryLayout::Q35, None);
        assert!(file.refresh().is_err(), "a directory");
        // Never through a symlink (a user who can write the directory could point it at any
        // file the backend may write), and never a file every user may write.
        let ram = ram_file(dir.path(), 16 << 20);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ram, &link).unwrap();
        assert!(MemoryFile::new(link, MemoryLayout::Q35, None)
            .refresh()
            .is_err());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut open = MemoryFile::new(ram.clone(), MemoryLayout::Q35, None);
        assert!(open.refresh().is_err(), "world-writable");
        std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(open.refresh().unwrap().is_some());
    }

    #[test]
    fn a_table_on_the_same_file_at_the_same_offsets_agrees_and_any_other_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = ram_file(dir.path(), 64 << 20);
        let mut file = MemoryFile::new(path.clone(), "0:32M@0,4G:32M@32M".parse().unwrap(), None);
        file.refresh().unwrap();
        let table_of = |ranges: &[(u64, u64, u64)], f: &Path| {
            let f = Arc::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(f)
                    .unwrap(),
            );
            let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files(ranges.iter().map(
                |&(gpa, len, offset)| {
                    (
                        vm_memory::GuestAddress(gpa),
                        len as usize,
                        Some(vm_memory::FileOffset::from_arc(f.clone(), offset)),
                    )
                },
            ))
            .unwrap();
            crate::vhu_balloon::regions_of(&mem)
        };
        // QEMU's table may leave holes (the legacy VGA and ROM window), never move bytes.
        let agreeing = table_of(
            &[
                (0, 0xa0000, 0),
                (0x100000, (32 << 20) - 0x100000, 0x100000),
                (FOUR_GIB, 32 << 20, 32 << 20),
            ],
            &path,
        );
        file.check_table(&agreeing).unwrap();
        let shifted = table_of(&[(FOUR_GIB, 32 << 20, 0)], &path);
        let e = file.check_table(&shifted).unwrap_err().to_string();
        assert!(e.contains("file offset"), "{e}");
        let outside = table_of(&[(2 * GIB, 4096, 0)], &path);
        let e = file.check_table(&outside).unwrap_err().to_string();
        assert!(e.contains("not inside"), "{e}");
        let other_dir = tempfile::tempdir().unwrap();
        let other_path = ram_file(other_dir.path(), 64 << 20);
        let e = file
            .check_table(&table_of(&[(0, 32 << 20, 0)], &other_path))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another file"), "{e}");
    }
}
