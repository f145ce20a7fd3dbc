//! Streaming message bodies from one socket to another without buffering them whole:
//! `Content-Length`, chunked (decoded only to find its end; the bytes go through
//! unchanged, trailers included, except to an HTTP/1.0 client, which cannot read chunked and
//! gets the data alone) and read-until-close. A sender idle past the given timeout fails the
//! body.

use std::io;

use crate::io::Stream;

use super::head::Framing;

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Size of the scratch buffer a body moves through.
pub const BODY_BUFFER: usize = 16 * 1024;

/// Why a body did not get through.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the sender failed.
    #[error("reading the body: {0}")]
    Read(io::Error),
    /// The sender closed before the body ended.
    #[error("the sender closed before the body ended")]
    Truncated,
    /// Writing to the receiver failed.
    #[error("writing the body: {0}")]
    Write(io::Error),
    /// Invalid chunked framing.
    #[error("invalid chunked encoding: {0}")]
    Chunked(&'static str),
    /// The sender sent nothing for the idle timeout; its socket must not be read again.
    #[error("the sender went idle mid-body")]
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { digits: usize },
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// Finds where a chunked body ends, fed any number of pieces. Strict about line endings
/// (CRLF only), as a smuggling-safe proxy must be.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    remaining: u64,
    line: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            remaining: 0,
            line: 0,
        }
    }
}

impl ChunkedDecoder {
    /// Whether the terminating chunk and trailers have been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes of the body from `input`; returns how many belong to it. Fewer than
    /// `input.len()` only when the body ended inside `input`.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        self.step(input, false).map(|(used, _)| used)
    }

    /// Consumes bytes of the body from `buf` as [`Self::feed`] does, and moves the chunks'
    /// data to the front of `buf`, without their framing and trailers. Returns how many bytes
    /// belong to the body and how many of data are now at the front.
    pub fn dechunk(&mut self, buf: &mut [u8]) -> Result<(usize, usize), BodyError> {
        let (mut used, mut data) = (0, 0);
        loop {
            let (n, run) = self.step(&buf[used..], true)?;
            let Some(run) = run else {
                return Ok((used + n, data));
            };
            buf.copy_within(used + run.start..used + run.end, data);
            data += run.len();
            used += n;
        }
    }

    /// Consumes bytes of `input` until its end or the body's, or, when `stop_after_data`,
    /// until the end of a run of chunk data, which it returns.
    fn step(
        &mut self,
        input: &[u8],
        stop_after_data: bool,
    ) -> Result<(usize, Option<std::ops::Range<usize>>), BodyError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => return Ok((i, None)),
                State::Data => {
                    let take = usize::try_from(self.remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    if stop_after_data {
                        return Ok((i, Some(i - take..i)));
                    }
                    continue;
                }
                State::Size { digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).unwrap_or(0);
                        if digits >= 15 {
                            return Err(BodyError::Chunked("chunk size too large"));
                        }
                        self.remaining = self.remaining * 16 + u64::from(digit);
                        self.state = State::Size { digits: digits + 1 };
                    }
                    b';' | b' ' | b'\t' if digits > 0 => {
                        self.state = State::Extension;
                        self.line = 0;
                    }
                    b'\r' if digits > 0 => self.state = State::SizeLf,
                    _ => return Err(BodyError::Chunked("invalid chunk size")),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(BodyError::Chunked("bare LF")),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(BodyError::Chunked("chunk extension too long"));
                        }
                    }
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("expected LF after chunk size"));
                    }
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(BodyError::Chunked("expected CRLF after chunk data"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("expected CRLF after chunk data"));
                    }
                    self.state = State::Size { digits: 0 };
                    self.remaining = 0;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if b == b'\n' {
                        return Err(BodyError::Chunked("bare LF"));
                    } else {
                        self.state = State::Trailer;
                        self.line = 1;
                    }
                }
                State::Trailer => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err(BodyError::Chunked("bare LF")),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_CHUNK_LINE {
                            return Err(BodyError::Chunked("trailer too long"));
                        }
                    }
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("expected LF after trailer"));
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(BodyError::Chunked("expected LF at end of body"));
                    }
                    self.state = State::Done;
                    return Ok((i + 1, None));
                }
            }
            i += 1;
        }
        Ok((i, None))
    }
}

/// What [`forward`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Body bytes written to the receiver.
    pub body: u64,
    /// Bytes read from the sender while forwarding (not counting `pending`).
    pub read: u64,
}

/// Tracks how much of a body is left.
enum Progress {
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Chunked, passed on as its data alone.
    Dechunked(ChunkedDecoder),
    UntilClose,
}

/// What of a piece of the sender's bytes goes to the receiver.
struct Taken {
    /// Bytes of the piece that belong to the body.
    used: usize,
    /// Bytes at the piece's start to pass on (`used`, or fewer once de-chunked).
    out: usize,
    /// The body ended inside the piece.
    done: bool,
}

impl Progress {
    /// How much of `data` belongs to the body and goes on; de-chunking moves the data to
    /// the front of `data`.
    fn take(&mut self, data: &mut [u8]) -> Result<Taken, BodyError> {
        let (used, out, done) = match self {
            Progress::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= n as u64;
                (n, n, *left == 0)
            }
            Progress::Chunked(decoder) => {
                let n = decoder.feed(data)?;
                (n, n, decoder.is_done())
            }
            Progress::Dechunked(decoder) => {
                let (n, out) = decoder.dechunk(data)?;
                (n, out, decoder.is_done())
            }
            Progress::UntilClose => (data.len(), data.len(), false),
        };
        Ok(Taken { used, out, done })
    }
}

/// Forwards one message from `src` to `dst`: the first `head` bytes of `pending` (a message
/// head already read, or 0), then the body; a chunked body as its data alone when
/// `dechunk` (the head must then say how it ends: by the close). The head and whatever part
/// of the body is already in `pending` go out in one write. `pending` holds bytes already
/// read from `src`; on return it holds whatever followed the body (a pipelined request,
/// say). `scratch` is a reusable buffer. A sender that sends nothing for `idle` fails the
/// body, and so does a receiver that does not take a write within `idle`. Returns what
/// moved.
#[allow(clippy::too_many_arguments)]
pub async fn forward<S: Stream, D: Stream>(
    src: &S,
    dst: &D,
    framing: Framing,
    dechunk: bool,
    head: usize,
    pending: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    idle: std::time::Duration,
) -> Result<Forwarded, BodyError> {
    let head = head.min(pending.len());
    let mut progress = match framing {
        Framing::Empty => None,
        Framing::Length(n) => Some(Progress::Length(n)),
        Framing::Chunked if dechunk => Some(Progress::Dechunked(ChunkedDecoder::default())),
        Framing::Chunked => Some(Progress::Chunked(ChunkedDecoder::default())),
        Framing::UntilClose => Some(Progress::UntilClose),
    };
    let taken = match &mut progress {
        None => Taken {
            used: 0,
            out: 0,
            done: true,
        },
        Some(progress) => progress.take(&mut pending[head..])?,
    };
    if head + taken.out > 0 {
        *pending = write(dst, std::mem::take(pending), head + taken.out, idle).await?;
    }
    pending.drain(..head + taken.used);
    let mut moved = Forwarded {
        body: taken.out as u64,
        read: 0,
    };
    let Some(mut progress) = progress.filter(|_| !taken.done) else {
        return Ok(moved);
    };
    if scratch.capacity() < BODY_BUFFER {
        scratch.reserve(BODY_BUFFER);
    }
    loop {
        scratch.clear();
        let (read, back) = match tokio::time::timeout(idle, src.read(std::mem::take(scratch))).await
        {
            Ok(read) => read,
            // The abandoned read may still be queued (io_uring): the caller closes `src`.
            Err(_) => return Err(BodyError::Idle),
        };
        *scratch = back;
        let got = read.map_err(BodyError::Read)?;
        moved.read += got as u64;
        if got == 0 {
            return match progress {
                Progress::UntilClose => Ok(moved),
                _ => Err(BodyError::Truncated),
            };
        }
        let taken = progress.take(&mut scratch[..got])?;
        if taken.out > 0 {
            *scratch = write(dst, std::mem::take(scratch), taken.out, idle).await?;
            moved.body += taken.out as u64;
        }
        if taken.done {
            pending.extend_from_slice(&scratch[taken.used..got]);
            return Ok(moved);
        }
    }
}

/// Writes the first `len` bytes of `buf` to `dst` and gives `buf` back. A receiver that has
/// not taken them all within `idle` (it stopped reading: a write is one read's worth, 16 KiB,
/// or a head and what came with it) fails the write, and its connection is aborted: nothing
/// more can reach it in order, and an abandoned write (io_uring keeps the socket while one is
/// in flight) must not hold it open. (One case stays: on io_uring a kernel-TLS socket, which
/// refuses the disconnect, is reset only once that write ends.)
async fn write<D: Stream>(
    dst: &D,
    buf: Vec<u8>,
    len: usize,
    idle: std::time::Duration,
) -> Result<Vec<u8>, BodyError> {
    match tokio::time::timeout(idle, dst.write_all(buf, 0..len)).await {
        Ok((Ok(()), buf)) => Ok(buf),
        Ok((Err(error), _)) => Err(BodyError::Write(error)),
        Err(_) => {
            dst.abort();
            Err(BodyError::Write(io::Error::new(
                io::ErrorKind::TimedOut,
                "the receiver took nothing for the idle timeout",
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(body: &[u8], piece: usize) -> Result<(usize, bool), BodyError> {
        let mut d = ChunkedDecoder::default();
        let mut used = 0;
        for part in body.chunks(piece) {
            let n = d.feed(part)?;
            used += n;
            if d.is_done() {
                break;
            }
        }
        Ok((used, d.is_done()))
    }

    #[test]
    fn finds_the_end_of_a_chunked_body_in_any_split() {
        let body = b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let end = body.len() - b"GET / HTTP/1.1\r\n".len();
        for piece in 1..body.len() {
            assert_eq!(
                decode_in_pieces(body, piece).unwrap(),
                (end, true),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn dechunking_keeps_the_data_alone_in_any_split() {
        let body = b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let end = body.len() - b"GET / HTTP/1.1\r\n".len();
        for piece in 1..body.len() {
            let mut decoder = ChunkedDecoder::default();
            let (mut used, mut data) = (0, Vec::new());
            for part in body.chunks(piece) {
                let mut part = part.to_vec();
                let (n, out) = decoder.dechunk(&mut part).unwrap();
                used += n;
                data.extend_from_slice(&part[..out]);
                if decoder.is_done() {
                    // What followed the body is left where it was.
                    assert_eq!(&part[n..], &body[used..used + part.len() - n]);
                    break;
                }
            }
            assert!(decoder.is_done(), "piece {piece}");
            assert_eq!(used, end, "piece {piece}");
            assert_eq!(
                String::from_utf8(data).unwrap(),
                "helloabcdefghijklmnopqrstuvwxyz",
                "piece {piece}"
            );
        }
        let mut bad = b"3\r\nabcX\r\n".to_vec();
        assert!(ChunkedDecoder::default().dechunk(&mut bad).is_err());
    }

    #[test]
    fn needs_more_until_the_last_chunk() {
        assert_eq!(decode_in_pieces(b"3\r\nabc\r\n", 100).unwrap(), (8, false));
        assert_eq!(decode_in_pieces(b"0\r\n\r", 100).unwrap(), (4, false));
    }

    #[test]
    fn refuses_bad_framing() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5\r\nhelloX\r\n",
            b"0\r\n\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                decode_in_pieces(bad, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
