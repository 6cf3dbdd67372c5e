//! The body signature: `Epidemic-Signature: sha256=HEX`, the lowercase hex HMAC-SHA256 of
//! the body keyed with the shared secret (GitHub's `X-Hub-Signature-256` scheme, so
//! receivers can reuse code they have).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header value for `body`: `sha256=` and the hex HMAC-SHA256.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length: new_from_slice cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` is the signature of `body` under `secret`, compared in constant time:
/// what a receiver written in Rust does.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_mac) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_mac) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_rfc_4231_test_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verify_accepts_its_own_signature_only() {
        let sig = signature(b"s3cret", b"{\"id\":1}");
        assert!(verify(b"s3cret", b"{\"id\":1}", &sig));
        assert!(!verify(b"s3cret", b"{\"id\":2}", &sig));
        assert!(!verify(b"other", b"{\"id\":1}", &sig));
        assert!(!verify(b"s3cret", b"{\"id\":1}", "sha256=zz"));
        assert!(!verify(b"s3cret", b"{\"id\":1}", &sig[7..]));
    }
}
