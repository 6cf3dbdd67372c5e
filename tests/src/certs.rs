//! Certificates made for a test: a CA, a server certificate it signed (for `localhost`
//! and `127.0.0.1`), a client certificate it signed, and a second CA that signed nothing
//! the servers use (the "wrong CA"). Written as PEM files into a directory of their own;
//! [`TestPki`] keeps their paths.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The files of one test PKI.
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed neither.
    pub wrong_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate whose common name is [`TestPki::CLIENT_NAME`].
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// The client certificate's common name: the database user it authenticates.
    pub const CLIENT_NAME: &'static str = "epidemic_cert";

    /// Make the certificates in `dir` (created if missing).
    pub fn generate(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).expect("create the certificate directory");
        let ca = ca("Epidemic test CA");
        let wrong_ca = ca_cert("Some other CA");

        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server names");
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server.signed_by(&server_key, &ca).expect("sign server");

        let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client
            .distinguished_name
            .push(DnType::CommonName, Self::CLIENT_NAME);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = client.signed_by(&client_key, &ca).expect("sign client");

        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write a certificate file");
            p
        };
        TestPki {
            dir: dir.to_owned(),
            ca: write("ca.pem", ca.pem()),
            wrong_ca: write("wrong-ca.pem", wrong_ca),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
        }
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().expect("CA key"))
        .expect("self-sign the CA")
}

fn ca_cert(name: &str) -> String {
    ca(name).pem()
}
