//! Authentication of the watchdog port: HMAC-SHA256 keyed with the job's secret.
//!
//! The secret is 32 random bytes that rank 0 draws at start-up and broadcasts over MPI; it is kept
//! in memory only (never printed, logged or written). Every request carries the tag
//! `HMAC(secret, REQUEST_LABEL || target rank || nonce || request)`, where the nonce is the one the
//! listener sent on that connection: a line captured on the network is only valid on the one
//! connection it was made for, so it cannot be replayed later, to another rank, or reordered.
//! Answers carry `HMAC(secret, ANSWER_LABEL || target rank || nonce || request || answer)`, so a
//! process that took over a dead rank's port cannot make up an answer either. Tags are compared in
//! constant time.

use sha2::{Digest, Sha256};

pub(crate) const SECRET_LEN: usize = 32;
/// Hex digits of a tag on the wire.
pub(crate) const TAG_HEX: usize = 64;

/// The job's shared secret.
pub(crate) type Secret = [u8; SECRET_LEN];
type Tag = [u8; 32];

const REQUEST_LABEL: &[u8] = b"fabbrica-watchdog/1 request\0";
const ANSWER_LABEL: &[u8] = b"fabbrica-watchdog/1 answer\0";

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Tag {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The tag of `request` sent to world rank `target` on the connection that issued `nonce`.
pub(crate) fn request_tag(secret: &Secret, target: usize, nonce: u64, request: &[u8]) -> Tag {
    hmac_sha256(secret, &[REQUEST_LABEL, &(target as u64).to_le_bytes(), &nonce.to_le_bytes(), request])
}

/// The tag of the answer to `request` (see [`request_tag`]).
pub(crate) fn answer_tag(secret: &Secret, target: usize, nonce: u64, request: &[u8], answer: &[u8]) -> Tag {
    let len = (request.len() as u64).to_le_bytes();
    hmac_sha256(secret, &[ANSWER_LABEL, &(target as u64).to_le_bytes(), &nonce.to_le_bytes(), &len, request, answer])
}

/// `<tag in hex> <body>\n`.
pub(crate) fn seal(tag: &Tag, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TAG_HEX + 2 + body.len());
    for b in tag {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out.push(b' ');
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}

/// The body of a line `<tag in hex> <body>` (newline removed) when its tag is `expected(body)`;
/// None for anything else (no tag, a short or malformed tag, a wrong one).
pub(crate) fn open(line: &[u8], expected: impl FnOnce(&[u8]) -> Tag) -> Option<&[u8]> {
    if line.len() <= TAG_HEX || line[TAG_HEX] != b' ' {
        return None;
    }
    let given = decode_tag(&line[..TAG_HEX])?;
    let body = &line[TAG_HEX + 1..];
    ct_eq(&given, &expected(body)).then_some(body)
}

fn decode_tag(hex: &[u8]) -> Option<Tag> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let mut tag = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        tag[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(tag)
}

/// Equality whose time does not depend on where the tags differ.
fn ct_eq(a: &Tag, b: &Tag) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// A fresh secret from the kernel's random source: getrandom(2), else /dev/urandom.
pub(crate) fn random_secret() -> std::io::Result<Secret> {
    let mut s = [0u8; SECRET_LEN];
    let mut filled = 0;
    while filled < s.len() {
        let rest = &mut s[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            filled += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        } else {
            use std::io::Read;
            std::fs::File::open("/dev/urandom")?.read_exact(&mut s)?;
            return Ok(s);
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(t: &Tag) -> String {
        t.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        assert_eq!(hex(&hmac_sha256(&[0x0b; 20], &[b"Hi ", b"There"])), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(&[0xaa; 131], &[b"Test Using Larger Than Block-Size Key - Hash Key First"])),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn only_the_line_made_for_this_connection_with_this_secret_opens() {
        let secret = random_secret().unwrap();
        let other = random_secret().unwrap();
        assert_ne!(secret, other, "two draws of 32 random bytes");
        let (rank, nonce, req) = (1usize, 7u64, &b"A rank 0 aborted the job"[..]);
        let check = |line: &[u8], n: u64| open(line, |b| request_tag(&secret, rank, n, b)).map(|b| b.to_vec());
        let line = seal(&request_tag(&secret, rank, nonce, req), req);
        let line = &line[..line.len() - 1]; // the reader strips the newline
        assert_eq!(check(line, nonce).as_deref(), Some(req), "the genuine request");

        // A tag made with another secret.
        let forged = seal(&request_tag(&other, rank, nonce, req), req);
        assert_eq!(check(&forged[..forged.len() - 1], nonce), None, "another secret");
        // Replayed on a later connection, or a request made for a later nonce sent earlier.
        assert_eq!(check(line, nonce + 1), None, "replayed");
        let later = seal(&request_tag(&secret, rank, nonce + 1, req), req);
        assert_eq!(check(&later[..later.len() - 1], nonce), None, "reordered");
        // Made for another rank.
        let elsewhere = seal(&request_tag(&secret, 0, nonce, req), req);
        assert_eq!(check(&elsewhere[..elsewhere.len() - 1], nonce), None, "another rank");
        // The body changed under a valid tag.
        let mut changed = line.to_vec();
        *changed.last_mut().unwrap() ^= 1;
        assert_eq!(check(&changed, nonce), None, "changed body");
        // Truncated tags: a digit short (the separator moves), the tag alone, nothing.
        let mut short = line[..TAG_HEX - 1].to_vec();
        short.extend_from_slice(&line[TAG_HEX..]);
        assert_eq!(check(&short, nonce), None, "63 digits");
        let mut half = line[..TAG_HEX / 2].to_vec();
        half.extend_from_slice(&line[TAG_HEX..]);
        assert_eq!(check(&half, nonce), None, "32 digits");
        assert_eq!(check(&line[..TAG_HEX], nonce), None, "tag without body");
        assert_eq!(check(b"", nonce), None, "empty line");
        // Not hex, or upper case where the sender writes lower case.
        let mut upper = line[..TAG_HEX].to_ascii_uppercase();
        upper.extend_from_slice(&line[TAG_HEX..]);
        assert_ne!(&upper[..], line, "the tag has letters");
        assert_eq!(check(&upper, nonce), None, "not our hex");
        // The old protocol.
        assert_eq!(check(b"A stranger says stop", nonce), None, "old protocol");
        assert_eq!(check(b"Q world", nonce), None, "old protocol query");
    }

    #[test]
    fn answers_are_bound_to_their_request() {
        let secret = random_secret().unwrap();
        let tag = answer_tag(&secret, 2, 9, b"Q world", b"3\tall_reduce #3\tno operation in flight");
        assert_ne!(tag, answer_tag(&secret, 2, 9, b"Q pp0", b"3\tall_reduce #3\tno operation in flight"));
        assert_ne!(tag, answer_tag(&secret, 2, 10, b"Q world", b"3\tall_reduce #3\tno operation in flight"));
        // The request/answer boundary is part of the tag.
        assert_ne!(tag, answer_tag(&secret, 2, 9, b"Q world3", b"\tall_reduce #3\tno operation in flight"));
    }
}
