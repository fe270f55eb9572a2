//! The MNIST database from its gzip-compressed IDX files (`data/mnist/`).
//!
//! IDX: a big-endian u32 magic (0x00000803 for images, 0x00000801 for labels), the item
//! count, for images the row and column counts, then one byte per pixel (row-major) or per
//! label. Everything is checked: magic numbers, counts (images against labels, and each
//! split against its known size), 28x28 images, exact lengths, labels in 0..=9.

use ndarray::Array2;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Magic number of an IDX file of unsigned-byte 3-D data (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte 1-D data (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Image height and width.
pub const SIDE: usize = 28;
/// Pixels per image.
pub const PIXELS: usize = SIDE * SIDE;
/// Number of classes.
pub const CLASSES: usize = 10;
/// The largest decompressed file read (the training images take 47,040,016 bytes).
const MAX_DECOMPRESSED: u64 = 64 << 20;

/// Errors of the MNIST loader.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MnistError {
    /// Reading or decompressing a file failed.
    #[error("MNIST file {path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the error
        source: std::io::Error,
    },
    /// A decompressed file larger than the limit.
    #[error("MNIST file {path}: decompresses to more than {limit} bytes")]
    TooLarge {
        /// the file
        path: PathBuf,
        /// the limit
        limit: u64,
    },
    /// The IDX magic number is wrong.
    #[error("MNIST file {path}: magic number {actual:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// the file
        path: PathBuf,
        /// the expected magic
        expected: u32,
        /// the magic found
        actual: u32,
    },
    /// Images that are not 28x28.
    #[error("MNIST file {path}: images are {rows}x{cols}, expected {SIDE}x{SIDE}")]
    BadDimensions {
        /// the file
        path: PathBuf,
        /// rows per image
        rows: u32,
        /// columns per image
        cols: u32,
    },
    /// The file's length does not match its header.
    #[error("MNIST file {path}: {actual} bytes, the header declares {expected}")]
    Length {
        /// the file
        path: PathBuf,
        /// bytes declared (header + data)
        expected: u64,
        /// bytes present (decompressed)
        actual: u64,
    },
    /// A split with the wrong number of items.
    #[error("MNIST file {path}: {actual} items, the {split} split has {expected}")]
    Count {
        /// the file
        path: PathBuf,
        /// the split
        split: Split,
        /// items expected
        expected: usize,
        /// items found
        actual: usize,
    },
    /// Images and labels differ in number.
    #[error("MNIST: {images} images but {labels} labels")]
    CountMismatch {
        /// number of images
        images: usize,
        /// number of labels
        labels: usize,
    },
    /// A label outside 0..=9.
    #[error("MNIST file {path}: label {label} of item {index} is not a digit")]
    BadLabel {
        /// the file
        path: PathBuf,
        /// the item
        index: usize,
        /// the label
        label: u8,
    },
    /// A range outside the dataset.
    #[error("MNIST: range {start}..{end} is outside 0..{len}")]
    Range {
        /// range start
        start: usize,
        /// range end
        end: usize,
        /// dataset size
        len: usize,
    },
}

/// The two MNIST splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 60,000 training images.
    Train,
    /// 10,000 test images (t10k).
    Test,
}

impl Split {
    /// The split's file stem (`"train"` or `"t10k"`).
    pub fn stem(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    /// The split's number of images.
    pub fn size(self) -> usize {
        match self {
            Split::Train => 60_000,
            Split::Test => 10_000,
        }
    }

    /// The gzip file of the split's images in `dir`.
    pub fn images_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}-images-idx3-ubyte.gz", self.stem()))
    }

    /// The gzip file of the split's labels in `dir`.
    pub fn labels_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}-labels-idx1-ubyte.gz", self.stem()))
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.stem())
    }
}

/// Labelled 28x28 8-bit images, row-major.
#[derive(Clone, PartialEq, Eq)]
pub struct Dataset {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("images", &self.labels.len())
            .finish()
    }
}

impl Dataset {
    /// A dataset from `n * 784` pixels and `n` labels (each 0..=9).
    pub fn new(images: Vec<u8>, labels: Vec<u8>) -> Result<Self, MnistError> {
        if images.len() != labels.len() * PIXELS {
            return Err(MnistError::CountMismatch {
                images: images.len() / PIXELS,
                labels: labels.len(),
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= CLASSES)
        {
            return Err(MnistError::BadLabel {
                path: PathBuf::new(),
                index,
                label,
            });
        }
        Ok(Self { images, labels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All pixels, row-major, 784 per image.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        self.images.get(i * PIXELS..(i + 1) * PIXELS)
    }

    /// The label of image `i`.
    pub fn label(&self, i: usize) -> Option<u8> {
        self.labels.get(i).copied()
    }

    /// Images `range` as a new dataset.
    pub fn slice(&self, range: Range<usize>) -> Result<Self, MnistError> {
        let err = MnistError::Range {
            start: range.start,
            end: range.end,
            len: self.len(),
        };
        if range.start > range.end || range.end > self.len() {
            return Err(err);
        }
        Ok(Self {
            images: self.images[range.start * PIXELS..range.end * PIXELS].to_vec(),
            labels: self.labels[range].to_vec(),
        })
    }

    /// The images as f32 rows scaled to [0, 1] (p / 255), shape `[n, 784]`.
    pub fn to_f32(&self) -> Array2<f32> {
        let v: Vec<f32> = self.images.iter().map(|&p| f32::from(p) / 255.0).collect();
        // The length is n * 784 by construction.
        Array2::from_shape_vec((self.len(), PIXELS), v)
            .unwrap_or_else(|_| Array2::zeros((0, PIXELS)))
    }
}

/// Loads one split from the directory holding the four `.gz` files.
pub fn load(dir: impl AsRef<Path>, split: Split) -> Result<Dataset, MnistError> {
    let dir = dir.as_ref();
    let images_path = split.images_path(dir);
    let labels_path = split.labels_path(dir);
    let images = read_images(&images_path)?;
    let labels = read_labels(&labels_path)?;
    let n = images.len() / PIXELS;
    if n != split.size() {
        return Err(MnistError::Count {
            path: images_path,
            split,
            expected: split.size(),
            actual: n,
        });
    }
    if labels.len() != split.size() {
        return Err(MnistError::Count {
            path: labels_path,
            split,
            expected: split.size(),
            actual: labels.len(),
        });
    }
    Dataset::new(images, labels)
}

/// The decompressed bytes of a gzip file (at most 64 MiB).
pub fn decompress(path: &Path) -> Result<Vec<u8>, MnistError> {
    let io = |source| MnistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(io)?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(MnistError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_DECOMPRESSED,
        });
    }
    Ok(out)
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn short(path: &Path, expected: u64, actual: usize) -> MnistError {
    MnistError::Length {
        path: path.to_path_buf(),
        expected,
        actual: actual as u64,
    }
}

/// Parses an IDX image file's decompressed bytes: returns n * 784 pixels.
pub fn parse_images(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, MnistError> {
    let magic = be_u32(bytes, 0).ok_or_else(|| short(path, 16, bytes.len()))?;
    if magic != IMAGES_MAGIC {
        return Err(MnistError::BadMagic {
            path: path.to_path_buf(),
            expected: IMAGES_MAGIC,
            actual: magic,
        });
    }
    let (Some(n), Some(rows), Some(cols)) = (be_u32(bytes, 4), be_u32(bytes, 8), be_u32(bytes, 12))
    else {
        return Err(short(path, 16, bytes.len()));
    };
    if rows as usize != SIDE || cols as usize != SIDE {
        return Err(MnistError::BadDimensions {
            path: path.to_path_buf(),
            rows,
            cols,
        });
    }
    let expected = 16 + u64::from(n) * PIXELS as u64;
    if bytes.len() as u64 != expected {
        return Err(short(path, expected, bytes.len()));
    }
    Ok(bytes[16..].to_vec())
}

/// Parses an IDX label file's decompressed bytes.
pub fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, MnistError> {
    let magic = be_u32(bytes, 0).ok_or_else(|| short(path, 8, bytes.len()))?;
    if magic != LABELS_MAGIC {
        return Err(MnistError::BadMagic {
            path: path.to_path_buf(),
            expected: LABELS_MAGIC,
            actual: magic,
        });
    }
    let n = be_u32(bytes, 4).ok_or_else(|| short(path, 8, bytes.len()))?;
    let expected = 8 + u64::from(n);
    if bytes.len() as u64 != expected {
        return Err(short(path, expected, bytes.len()));
    }
    let labels = bytes[8..].to_vec();
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(MnistError::BadLabel {
            path: path.to_path_buf(),
            index,
            label,
        });
    }
    Ok(labels)
}

/// Reads a gzip IDX image file.
pub fn read_images(path: &Path) -> Result<Vec<u8>, MnistError> {
    parse_images(path, &decompress(path)?)
}

/// Reads an IDX image file, gzip-compressed or raw (told apart by the gzip magic
/// bytes), at most 64 MiB of image data; every check of [`parse_images`] applies.
pub fn read_images_any(path: &Path) -> Result<Vec<u8>, MnistError> {
    let io = |source| MnistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut magic = Vec::with_capacity(2);
    file.take(2).read_to_end(&mut magic).map_err(io)?;
    if magic == [0x1f, 0x8b] {
        return read_images(path);
    }
    if len > MAX_DECOMPRESSED {
        return Err(MnistError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_DECOMPRESSED,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse_images(path, &bytes)
}

/// Reads a gzip IDX label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, MnistError> {
    parse_labels(path, &decompress(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(n: u32, rows: u32, cols: u32, extra: isize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&rows.to_be_bytes());
        v.extend_from_slice(&cols.to_be_bytes());
        let len = (n * rows * cols) as isize + extra;
        v.extend(std::iter::repeat_n(7u8, len.max(0) as usize));
        v
    }

    #[test]
    fn images_are_read_raw_or_gzip() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let raw = idx_images(2, 28, 28, 0);
        let rp = dir.path().join("x.idx");
        std::fs::write(&rp, &raw).unwrap();
        assert_eq!(read_images_any(&rp).unwrap().len(), 2 * PIXELS);
        let gp = dir.path().join("x.idx.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        std::fs::write(&gp, gz.finish().unwrap()).unwrap();
        assert_eq!(read_images_any(&gp).unwrap(), read_images_any(&rp).unwrap());
        std::fs::write(&rp, &raw[..raw.len() - 1]).unwrap();
        assert!(matches!(
            read_images_any(&rp),
            Err(MnistError::Length { .. })
        ));
        std::fs::write(&rp, [0x1f]).unwrap();
        assert!(matches!(
            read_images_any(&rp),
            Err(MnistError::Length { .. })
        ));
        assert!(matches!(
            read_images_any(&dir.path().join("missing")),
            Err(MnistError::Io { .. })
        ));
    }

    #[test]
    fn idx_refusals_are_named() {
        let p = Path::new("x");
        assert_eq!(
            parse_images(p, &idx_images(2, 28, 28, 0)).unwrap().len(),
            2 * PIXELS
        );
        assert!(matches!(
            parse_images(p, &idx_images(2, 28, 27, 0)),
            Err(MnistError::BadDimensions {
                rows: 28,
                cols: 27,
                ..
            })
        ));
        assert!(matches!(
            parse_images(p, &idx_images(2, 28, 28, -1)),
            Err(MnistError::Length {
                expected: 1584,
                actual: 1583,
                ..
            })
        ));
        assert!(matches!(
            parse_images(p, &idx_images(2, 28, 28, 1)),
            Err(MnistError::Length { .. })
        ));
        assert!(matches!(
            parse_images(p, &[0, 0, 8]),
            Err(MnistError::Length { .. })
        ));
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 9, 0];
        assert_eq!(parse_labels(p, &labels).unwrap(), vec![1, 9, 0]);
        assert!(matches!(
            parse_images(p, &labels),
            Err(MnistError::BadMagic {
                expected: IMAGES_MAGIC,
                actual: LABELS_MAGIC,
                ..
            })
        ));
        labels[9] = 10;
        assert!(matches!(
            parse_labels(p, &labels),
            Err(MnistError::BadLabel {
                index: 1,
                label: 10,
                ..
            })
        ));
        labels.pop();
        assert!(matches!(
            parse_labels(p, &labels),
            Err(MnistError::Length { .. })
        ));
        assert!(matches!(
            Dataset::new(vec![0; PIXELS], vec![1, 2]),
            Err(MnistError::CountMismatch {
                images: 1,
                labels: 2
            })
        ));
    }
}
