//! The DPS emulator over real HTTP (and once over TLS), driven by raw reqwest requests and
//! SAS tokens built by the test harness, checked against the spec and the recorded real
//! responses in reference/dps-api.md (§3 shapes, §4 errors, §7.3 bulk).
mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::emulator::{self as harness, parse_connection_string, sas_token, sas_token_at};
use dps_station::emulator::EmulatorOptions;
use reqwest::{header::HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

/// A TPM2B_PUBLIC EK recorded from the real service (reference/dps-api.md §3, Python SDK
/// recording `test_enrollment_tpm_lifecycle`); 316 bytes, size prefix 314.
const EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAibym9HQP9vxCGF5dVc1QQsAGe021aUGJzNol1/gycBx3jFsTpwmWbISRwnFvflWd0w2Mc44FAAZNaJOAAxwZvG8GvyLlHh6fGKdh+mSBL4iLH2bZ4Ry22cB3CJVjXmdGoz9Y/j3/NwLndBxQC+baNvzvyVQZ4/A2YL7vzIIj2ik4y+ve9ir7U0GbNdnxskqK1KFIITVVtkTIYyyFTIR0BySjPrRIDj7r7Mh5uF9HBppGKQCBoVSVV8dI91lNazmSdpGWyqCkO7iM4VvUMv2HT/ym53aYlUrau+Qq87Tu+uQipWYgRdF11KDfcpMHqqzBQQ1NpOJVhrsTrhyJzO7KNw==";

const TLS_HOST: &str = "test-dps.azure-devices-provisioning.net";

/// A minimal raw client: base URL, Authorization header, api-version on every call.
struct Dps {
    http: reqwest::Client,
    base: String,
    token: String,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Dps {
    fn new(emu: &dps_station::emulator::RunningEmulator) -> Dps {
        Dps {
            http: reqwest::Client::new(),
            base: emu.base_url(),
            token: harness::token_for(emu),
        }
    }

    fn with_token(&self, token: String) -> Dps {
        Dps {
            http: self.http.clone(),
            base: self.base.clone(),
            token,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut rb = self
            .http
            .request(
                method,
                format!("{}{path}{sep}api-version=2021-10-01", self.base),
            )
            .header("Authorization", &self.token);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = rb.send().await.expect("request reaches the emulator");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON body")
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn put(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::PUT, path, Some(body), headers).await
    }
    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, &[]).await
    }
    async fn post(&self, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::POST, path, body, headers).await
    }
    async fn delete(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::DELETE, path, None, headers).await
    }
}

fn tpm_enrollment(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}})
}

/// A DPS error body (ProvisioningServiceErrorDetails) with this errorCode and header.
fn assert_dps_error(r: &Reply, status: u16, code: u64) {
    assert_eq!(r.status.as_u16(), status, "{}", r.body);
    assert_eq!(r.body["errorCode"].as_u64(), Some(code), "{}", r.body);
    assert!(
        r.body["trackingId"].as_str().is_some_and(|t| !t.is_empty()),
        "{}",
        r.body
    );
    assert!(r.body["message"].is_string(), "{}", r.body);
    assert!(
        is_dotnet_time(r.body["timestampUtc"].as_str().unwrap_or("")),
        "{}",
        r.body
    );
    assert_eq!(
        r.headers
            .get("x-ms-error-code")
            .and_then(|v| v.to_str().ok()),
        Some(code.to_string().as_str())
    );
}

/// `2023-05-19T23:10:42.3915513Z` (7 fractional digits, §3).
fn is_dotnet_time(s: &str) -> bool {
    let re = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{7}Z$").unwrap();
    re.is_match(s)
}

/// etag = base64 of a quoted uuid-like id (§3).
fn assert_etag_shape(etag: &str) {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(etag)
        .expect("etag is base64");
    let text = String::from_utf8(raw).unwrap();
    let re =
        regex::Regex::new(r#"^"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"$"#)
            .unwrap();
    assert!(re.is_match(&text), "{text}");
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

/// Every individual-enrollment operation, wire shapes and error paths; run over HTTP and TLS.
async fn enrollment_lifecycle(dps: &Dps) {
    // Create, Python-SDK style: unset optional fields sent as null (§3).
    let mut body = tpm_enrollment("Board-0001");
    for f in [
        "capabilities",
        "reprovisionPolicy",
        "iotHubs",
        "initialTwin",
        "iotHubHostName",
        "customAllocationDefinition",
    ] {
        body[f] = Value::Null;
    }
    body["deviceId"] = json!("device-0001");
    body["allocationPolicy"] = json!("static");
    body["futureField"] = json!({"kept": true});
    let created = dps.put("/enrollments/Board-0001", &body, &[]).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    assert_eq!(
        created
            .headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap(),
        "application/json; charset=utf-8"
    );
    let rec = &created.body;
    // Recorded PUT response order and content (tpm lifecycle recording): nulls omitted,
    // no registrationState, provisioningStatus defaulted.
    assert_eq!(
        keys(rec),
        [
            "registrationId",
            "deviceId",
            "attestation",
            "etag",
            "provisioningStatus",
            "createdDateTimeUtc",
            "lastUpdatedDateTimeUtc",
            "allocationPolicy",
            "futureField"
        ]
    );
    assert_eq!(rec["registrationId"], "Board-0001");
    assert_eq!(
        rec["attestation"],
        json!({"type": "tpm", "tpm": {"endorsementKey": EK}})
    );
    assert_eq!(rec["provisioningStatus"], "enabled");
    assert_eq!(rec["futureField"], json!({"kept": true}));
    let etag1 = rec["etag"].as_str().unwrap().to_string();
    assert_etag_shape(&etag1);
    let created_at = rec["createdDateTimeUtc"].as_str().unwrap().to_string();
    assert!(is_dotnet_time(&created_at), "{created_at}");
    assert_eq!(rec["lastUpdatedDateTimeUtc"], rec["createdDateTimeUtc"]);

    // GET (case-insensitive id) adds registrationState {registrationId, status: unassigned}.
    let got = dps.get("/enrollments/board-0001").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.body["registrationState"],
        json!({"registrationId": "Board-0001", "status": "unassigned"})
    );
    assert_eq!(
        &keys(&got.body)[..3],
        ["registrationId", "deviceId", "registrationState"]
    );
    assert_eq!(got.body["etag"], etag1.as_str());

    // Attestation mechanism.
    let att = dps
        .post("/enrollments/BOARD-0001/attestationmechanism", None, &[])
        .await;
    assert_eq!(att.status, StatusCode::OK);
    assert_eq!(
        att.body,
        json!({"type": "tpm", "tpm": {"endorsementKey": EK}})
    );

    // PUT of an existing id without If-Match → 409201 (reference §7.2 choice).
    let again = dps
        .put(
            "/enrollments/board-0001",
            &tpm_enrollment("board-0001"),
            &[],
        )
        .await;
    assert_dps_error(&again, 409, 409201);

    // Update with the etag (seed workflow: get, change, put with If-Match).
    let mut upd = got.body.clone();
    upd["provisioningStatus"] = json!("disabled");
    let updated = dps
        .put("/enrollments/Board-0001", &upd, &[("If-Match", &etag1)])
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    let etag2 = updated.body["etag"].as_str().unwrap().to_string();
    assert_ne!(etag2, etag1);
    assert_etag_shape(&etag2);
    assert_eq!(updated.body["provisioningStatus"], "disabled");
    assert_eq!(updated.body["createdDateTimeUtc"], created_at.as_str());
    assert_ne!(updated.body["lastUpdatedDateTimeUtc"], created_at.as_str());
    assert!(updated.body.get("registrationState").is_none());

    // Stale etag → 412; quoted current etag (C# v1 style) and * work.
    let stale = dps
        .put("/enrollments/Board-0001", &upd, &[("If-Match", &etag1)])
        .await;
    assert_dps_error(&stale, 412, 412201);
    let quoted = format!("\"{etag2}\"");
    let q = dps
        .put("/enrollments/Board-0001", &upd, &[("If-Match", &quoted)])
        .await;
    assert_eq!(q.status, StatusCode::OK, "{}", q.body);
    let forced = dps
        .put("/enrollments/Board-0001", &upd, &[("If-Match", "*")])
        .await;
    assert_eq!(forced.status, StatusCode::OK);
    let etag_now = forced.body["etag"].as_str().unwrap().to_string();

    // Query returns the record (no registrationState, recorded query shape).
    let page = dps
        .post(
            "/enrollments/query",
            Some(&json!({"query": "SELECT *"})),
            &[],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers.get("x-ms-item-type").unwrap(), "Enrollment");
    assert!(page.headers.get("x-ms-continuation").is_none());
    let items = page.body.as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["etag"], etag_now.as_str());

    // Delete with a wrong etag → 412, then delete → 204 with no body, then 404s.
    let wrong = dps
        .delete("/enrollments/board-0001", &[("If-Match", &etag1)])
        .await;
    assert_dps_error(&wrong, 412, 412201);
    let del = dps
        .delete("/enrollments/board-0001", &[("If-Match", &etag_now)])
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(del.body, Value::Null);
    assert_dps_error(&dps.get("/enrollments/board-0001").await, 404, 404201);
    assert_dps_error(
        &dps.delete("/enrollments/board-0001", &[]).await,
        404,
        404201,
    );
    assert_dps_error(
        &dps.post("/enrollments/board-0001/attestationmechanism", None, &[])
            .await,
        404,
        404201,
    );
    let empty = dps
        .post(
            "/enrollments/query",
            Some(&json!({"query": "select * from enrollments"})),
            &[],
        )
        .await;
    assert_eq!(empty.body, json!([]));
}

#[tokio::test]
async fn enrollment_lifecycle_over_http() {
    let emu = harness::start().await;
    assert!(emu.base_url().starts_with("http://127.0.0.1:"));
    assert_eq!(emu.host_name(), emu.addr().to_string());
    enrollment_lifecycle(&Dps::new(&emu)).await;
    let stats = emu.stats();
    assert_eq!(stats.creates.get("board-0001"), Some(&1));
    assert!(stats.by_operation["IndividualEnrollment_CreateOrUpdate"] >= 5);
    emu.shutdown().await;
}

#[tokio::test]
async fn enrollment_lifecycle_over_tls_with_a_real_looking_host() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::tls::server_pki(dir.path(), TLS_HOST);
    let emu = harness::start_with(EmulatorOptions {
        host_name: Some(TLS_HOST.to_string()),
        tls_cert: Some(pki.cert_file.clone()),
        tls_key: Some(pki.key_file.clone()),
        ..Default::default()
    })
    .await;
    assert!(emu.base_url().starts_with("https://"));
    assert!(emu
        .connection_string()
        .starts_with(&format!("HostName={TLS_HOST};")));
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve(TLS_HOST, emu.addr())
        .build()
        .unwrap();
    let dps = Dps {
        http,
        base: format!("https://{TLS_HOST}:{}", emu.addr().port()),
        token: harness::token_for(&emu),
    };
    enrollment_lifecycle(&dps).await;
    emu.shutdown().await;
}

#[tokio::test]
async fn x509_records_return_certificate_info_not_the_certificate() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    let pem = common::tls::device_cert_pem("x509-dev-1");
    let der = pem::parse(&pem).unwrap().into_contents();
    let der_b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let sha256 = hex::encode_upper(<sha2::Sha256 as sha2::Digest>::digest(&der));

    // PEM text.
    let body = json!({"registrationId": "x509-dev-1", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}});
    let r = dps.put("/enrollments/x509-dev-1", &body, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let primary = &r.body["attestation"]["x509"]["clientCertificates"]["primary"];
    assert!(primary.get("certificate").is_none(), "{primary}");
    let info = &primary["info"];
    assert_eq!(info["sha256Thumbprint"], sha256.as_str());
    assert_eq!(info["subjectName"], "CN=x509-dev-1");
    assert_eq!(info["version"], 3);
    let serial = info["serialNumber"].as_str().unwrap();
    assert_eq!(serial, serial.to_ascii_uppercase());
    let re = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$").unwrap();
    assert!(
        re.is_match(info["notBeforeUtc"].as_str().unwrap()),
        "{info}"
    );
    assert!(re.is_match(info["notAfterUtc"].as_str().unwrap()), "{info}");
    for k in ["sha1Thumbprint", "issuerName"] {
        assert!(info[k].is_string(), "{k}");
    }
    let text = r.body.to_string();
    assert!(!text.contains("BEGIN CERTIFICATE") && !text.contains(&der_b64[..40]));

    // Attestation mechanism returns the same info.
    let att = dps
        .post("/enrollments/x509-dev-1/attestationmechanism", None, &[])
        .await;
    assert_eq!(
        att.body["x509"]["clientCertificates"]["primary"]["info"],
        *info
    );

    // Base64 DER (C# SDK form) is accepted too, giving the same info.
    let body = json!({"registrationId": "x509-dev-2", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": der_b64}}}}});
    let r2 = dps.put("/enrollments/x509-dev-2", &body, &[]).await;
    assert_eq!(r2.status, StatusCode::OK, "{}", r2.body);
    assert_eq!(
        r2.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"],
        *info
    );

    // A GET → update round trip (info only, no certificate) keeps the stored info.
    let got = dps.get("/enrollments/x509-dev-2").await.body;
    let etag = got["etag"].as_str().unwrap().to_string();
    let rt = dps
        .put("/enrollments/x509-dev-2", &got, &[("If-Match", &etag)])
        .await;
    assert_eq!(rt.status, StatusCode::OK, "{}", rt.body);
    assert_eq!(
        rt.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"],
        *info
    );

    // Garbage certificate → 400 naming the field.
    let bad = json!({"registrationId": "x509-dev-3", "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": "bm90IGEgY2VydA=="}}}}});
    let r3 = dps.put("/enrollments/x509-dev-3", &bad, &[]).await;
    assert_eq!(r3.status, StatusCode::BAD_REQUEST);
    assert!(
        r3.body["message"]
            .as_str()
            .unwrap()
            .contains("clientCertificates.primary.certificate"),
        "{}",
        r3.body
    );
}

#[tokio::test]
async fn enrollment_groups_every_operation() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    let ca = common::tls::ca_cert_pem("line-a-ca");
    let group = json!({"enrollmentGroupId": "line-a", "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": ca}}}},
        "initialTwin": {"tags": {"line": "A"}}});
    // Lower-case path segment as the Node SDK sends it.
    let r = dps.put("/enrollmentgroups/line-a", &group, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"]
            .as_str()
            .unwrap()
            .contains("CN=line-a-ca")
    );
    assert_eq!(r.body["initialTwin"], json!({"tags": {"line": "A"}}));
    assert!(r.body.get("registrationState").is_none());
    let etag = r.body["etag"].as_str().unwrap().to_string();

    assert_dps_error(
        &dps.put("/enrollmentGroups/line-a", &group, &[]).await,
        409,
        409202,
    );
    let got = dps.get("/enrollmentGroups/LINE-A").await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body.get("registrationState").is_none());
    let att = dps
        .post("/enrollmentGroups/line-a/attestationmechanism", None, &[])
        .await;
    assert_eq!(att.body["type"], "x509");

    // Symmetric-key group: the service generates keys that were not given.
    let sym = json!({"enrollmentGroupId": "sym-1", "attestation": {"type": "symmetricKey"}});
    let s = dps.put("/enrollmentGroups/sym-1", &sym, &[]).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.body);
    let pk = s.body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    assert!(
        base64::engine::general_purpose::STANDARD
            .decode(pk)
            .unwrap()
            .len()
            >= 16
    );
    // As recorded: GET and query hide the keys, the attestation mechanism shows them.
    assert_eq!(
        dps.get("/enrollmentGroups/sym-1").await.body["attestation"],
        json!({"type": "symmetricKey"})
    );
    let mech = dps
        .post("/enrollmentGroups/sym-1/attestationmechanism", None, &[])
        .await
        .body;
    assert_eq!(mech["symmetricKey"]["primaryKey"], pk);
    // An update that omits the keys keeps them.
    let sym_etag = s.body["etag"].as_str().unwrap().to_string();
    let upd = dps
        .put(
            "/enrollmentGroups/sym-1",
            &json!({"enrollmentGroupId": "sym-1",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": null}}}),
            &[("If-Match", &sym_etag)],
        )
        .await;
    assert_eq!(
        upd.body["attestation"]["symmetricKey"]["primaryKey"], pk,
        "{}",
        upd.body
    );

    // TPM is not a group attestation.
    let tpm_group = json!({"enrollmentGroupId": "g-tpm", "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}});
    assert_eq!(
        dps.put("/enrollmentGroups/g-tpm", &tpm_group, &[])
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    let q = dps
        .post("/enrollmentGroups/query", Some(&json!({"query": "*"})), &[])
        .await;
    assert_eq!(q.headers.get("x-ms-item-type").unwrap(), "EnrollmentGroup");
    assert_eq!(q.body.as_array().unwrap().len(), 2);

    // Group bulk: create of an existing group → 409202 "EnrollmentGroup already exists." (§7.3).
    let bulk = dps
        .post(
            "/enrollmentGroups",
            Some(&json!({"mode": "create", "enrollmentGroups": [group, sym]})),
            &[],
        )
        .await;
    assert_eq!(bulk.status, StatusCode::OK);
    assert_eq!(
        bulk.body,
        json!({"errors": [
        {"enrollmentGroupId": "line-a", "errorCode": 409202, "errorStatus": "EnrollmentGroup already exists."},
        {"enrollmentGroupId": "sym-1", "errorCode": 409202, "errorStatus": "EnrollmentGroup already exists."}],
        "isSuccessful": false})
    );

    assert_dps_error(
        &dps.delete("/enrollmentGroups/line-a", &[("If-Match", "bm9wZQ==")])
            .await,
        412,
        412202,
    );
    assert_eq!(
        dps.delete("/enrollmentGroups/line-a", &[("If-Match", &etag)])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_dps_error(&dps.get("/enrollmentGroups/line-a").await, 404, 404204);
    let del = dps
        .post(
            "/enrollmentGroups",
            Some(&json!({"mode": "delete", "enrollmentGroups": [{"enrollmentGroupId": "sym-1"}]})),
            &[],
        )
        .await;
    assert_eq!(del.body, json!({"errors": [], "isSuccessful": true}));
}

#[tokio::test]
async fn registration_states_get_query_delete() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    let admin = reqwest::Client::new();
    assert_dps_error(&dps.get("/registrations/dev-1").await, 404, 404202);
    // Seeding is an emulator-only admin call (a device registering).
    for (id, group) in [("dev-1", "grp"), ("dev-2", "grp"), ("dev-3", "other")] {
        let r = admin
            .put(format!("{}/_emulator/registrations/{id}", emu.base_url()))
            .body(json!({"enrollmentGroupId": group, "assignedHub": "hub.azure-devices.net", "deviceId": id}).to_string())
            .send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let got = dps.get("/registrations/DEV-1").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["registrationId"], "dev-1");
    assert_eq!(got.body["status"], "assigned");
    // Recorded shape and order (device registration lifecycle recording).
    assert_eq!(
        keys(&got.body),
        [
            "registrationId",
            "createdDateTimeUtc",
            "assignedHub",
            "deviceId",
            "status",
            "substatus",
            "lastUpdatedDateTimeUtc",
            "etag"
        ]
    );
    assert_eq!(got.body["assignedHub"], "hub.azure-devices.net");
    assert!(got.body.get("enrollmentGroupId").is_none());
    let etag = got.body["etag"].as_str().unwrap().to_string();

    // Query by group, no body, paged one at a time.
    let p1 = dps
        .post(
            "/registrations/grp/query",
            None,
            &[("x-ms-max-item-count", "1")],
        )
        .await;
    assert_eq!(p1.status, StatusCode::OK, "{}", p1.body);
    assert_eq!(
        p1.headers.get("x-ms-item-type").unwrap(),
        "DeviceRegistration"
    );
    let tok = p1
        .headers
        .get("x-ms-continuation")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let p2 = dps
        .post(
            "/registrations/grp/query",
            None,
            &[("x-ms-max-item-count", "1"), ("x-ms-continuation", &tok)],
        )
        .await;
    assert!(p2.headers.get("x-ms-continuation").is_none());
    let ids: Vec<&str> = p1
        .body
        .as_array()
        .unwrap()
        .iter()
        .chain(p2.body.as_array().unwrap())
        .map(|r| r["registrationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dev-1", "dev-2"]);

    // An enrollment's GET shows the device's registration state.
    assert_eq!(
        dps.put("/enrollments/dev-3", &tpm_enrollment("dev-3"), &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        dps.get("/enrollments/dev-3").await.body["registrationState"]["status"],
        "assigned"
    );

    assert_dps_error(
        &dps.delete("/registrations/dev-1", &[("If-Match", "bm9wZQ==")])
            .await,
        412,
        412203,
    );
    assert_eq!(
        dps.delete("/registrations/dev-1", &[("If-Match", &etag)])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_dps_error(&dps.get("/registrations/dev-1").await, 404, 404202);
    assert_dps_error(&dps.delete("/registrations/dev-1", &[]).await, 404, 404202);
}

#[tokio::test]
async fn unauthorized_requests_get_401() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    let p = parse_connection_string(&emu.connection_string());
    let other_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let cases = [
        ("wrong key", sas_token(&p.host_name, &p.policy, &other_key)),
        (
            "expired",
            sas_token_at(&p.host_name, &p.policy, &p.key, 1_600_000_000),
        ),
        (
            "wrong policy",
            sas_token(&p.host_name, "enrollmentread", &p.key),
        ),
        (
            "wrong sr",
            sas_token(
                "other-dps.azure-devices-provisioning.net",
                &p.policy,
                &p.key,
            ),
        ),
        ("not SAS", "Bearer abc".to_string()),
        ("empty", String::new()),
    ];
    for (what, token) in cases {
        let r = dps.with_token(token).get("/enrollments/a").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_dps_error(&r, 401, 401002);
        assert!(!r.body.to_string().contains(&p.key), "{what}: key echoed");
    }
    // sr with a scheme and an upper-case host (C SDK signs it verbatim) are accepted.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let url_form = sas_token_at(
        &format!("http://{}/", p.host_name),
        &p.policy,
        &p.key,
        now + 600,
    );
    assert_eq!(
        dps.with_token(url_form).get("/enrollments/a").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn bad_requests_get_400_naming_the_problem() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    // Missing api-version.
    let r = reqwest::Client::new()
        .get(format!("{}/enrollments/a", emu.base_url()))
        .header("Authorization", harness::token_for(&emu))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let b: Value = r.json().await.unwrap();
    assert!(b["message"].as_str().unwrap().contains("api-version"));
    // Older and newer dated versions are accepted (validated against 2021-10-01).
    for v in ["2019-03-31", "2025-07-01-preview"] {
        let r = dps.get(&format!("/enrollments/a?api-version={v}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{v}");
    }
    assert_eq!(
        dps.http
            .get(format!("{}/enrollments/a?api-version=latest", dps.base))
            .header("Authorization", &dps.token)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );

    // Schema: wrong type, missing required, bad enum — each names the field path.
    let cases = [
        (
            json!({"registrationId": "a1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": 5}}}),
            "attestation.tpm.endorsementKey",
        ),
        (json!({"registrationId": "a1"}), "attestation"),
        (
            json!({"registrationId": "a1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}, "provisioningStatus": "maybe"}),
            "provisioningStatus",
        ),
        (
            json!({"registrationId": "a1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": EK}}, "capabilities": {}}),
            "capabilities.iotEdge",
        ),
        (
            json!({"registrationId": "a1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}),
            "attestation.tpm.endorsementKey",
        ),
    ];
    for (body, field) in cases {
        let r = dps.put("/enrollments/a1", &body, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            r.body["errorCode"].as_u64().unwrap() / 1000 == 400,
            "{}",
            r.body
        );
        assert!(
            r.body["message"].as_str().unwrap().contains(field),
            "{field}: {}",
            r.body
        );
        assert!(r.headers.get("x-ms-error-code").is_some());
    }
    // Not JSON.
    let r = dps
        .http
        .put(format!(
            "{}/enrollments/a1?api-version=2021-10-01",
            dps.base
        ))
        .header("Authorization", &dps.token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Invalid registration ids: space, 129 characters, leading '-'.
    for id in ["has%20space", &"a".repeat(129), "-lead"] {
        let r = dps
            .put(
                &format!("/enrollments/{id}"),
                &tpm_enrollment(&id.replace("%20", " ")),
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{id}");
        assert_eq!(r.body["errorCode"], 400011, "{id}: {}", r.body);
    }
    // Path id must equal body id (case-insensitively).
    let r = dps
        .put("/enrollments/one", &tpm_enrollment("two"), &[])
        .await;
    assert_eq!(r.body["errorCode"], 400013);
    assert_eq!(
        dps.put("/enrollments/ONE", &tpm_enrollment("one"), &[])
            .await
            .status,
        StatusCode::OK
    );

    // Bulk with more than 10 items.
    let items: Vec<Value> = (0..11).map(|i| tpm_enrollment(&format!("b-{i}"))).collect();
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "create", "enrollments": items})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["errorCode"], 400012);
    assert_eq!(
        emu.stats().creates.len(),
        1,
        "nothing from the refused bulk was created"
    );
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "upsert", "enrollments": []})),
            &[],
        )
        .await;
    assert!(r.body["message"].as_str().unwrap().contains("mode"));

    // Unsupported query, bad continuation token.
    assert_eq!(
        dps.post(
            "/enrollments/query",
            Some(&json!({"query": "SELECT * FROM devices WHERE x"})),
            &[]
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        dps.post(
            "/enrollments/query",
            Some(&json!({"query": "*"})),
            &[("x-ms-continuation", "%%%")]
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
    // Unknown path and method.
    assert_eq!(dps.get("/nothing/here").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        dps.get("/enrollments/query/extra/more").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        dps.send(Method::PATCH, "/enrollments/one", None, &[])
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn bulk_results_match_the_recorded_service() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    let a = tpm_enrollment("bulk-a");
    let b = tpm_enrollment("bulk-b");
    // Trailing slash as the C SDK sends it.
    let r = dps
        .post(
            "/enrollments/",
            Some(&json!({"mode": "create", "enrollments": [a, b]})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!({"errors": [], "isSuccessful": true}));
    assert_eq!(keys(&r.body), ["errors", "isSuccessful"]);

    // `update` without etags on existing ids → 409201 per item (§7.3 recording).
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "update", "enrollments": [a, b]})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        json!({"errors": [
        {"registrationId": "bulk-a", "errorCode": 409201, "errorStatus": "Enrollment already exists."},
        {"registrationId": "bulk-b", "errorCode": 409201, "errorStatus": "Enrollment already exists."}],
        "isSuccessful": false})
    );

    // Mixed create: existing, new, invalid id, schema error → the new one is committed.
    let bad_schema = json!({"registrationId": "bulk-d", "attestation": {"type": "tpm"}});
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "create", "enrollments": [
        a, tpm_enrollment("bulk-c"), tpm_enrollment("bad id"), bad_schema]})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["isSuccessful"], false);
    let errs = r.body["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 3, "{}", r.body);
    assert_eq!(
        errs[0],
        json!({"registrationId": "bulk-a", "errorCode": 409201, "errorStatus": "Enrollment already exists."})
    );
    assert_eq!(errs[1]["registrationId"], "bad id");
    assert_eq!(errs[1]["errorCode"].as_u64().unwrap() / 1000, 400);
    assert_eq!(errs[2]["registrationId"], "bulk-d");
    assert_eq!(errs[2]["errorCode"].as_u64().unwrap() / 1000, 400);
    assert!(
        errs[2]["errorStatus"]
            .as_str()
            .unwrap()
            .contains("enrollments[3].attestation"),
        "{}",
        errs[2]
    );
    assert_eq!(dps.get("/enrollments/bulk-c").await.status, StatusCode::OK);
    assert_eq!(
        dps.get("/enrollments/bulk-d").await.status,
        StatusCode::NOT_FOUND
    );

    // `update` with the current etag succeeds; a new id is upserted; a stale etag → 412.
    let cur = dps.get("/enrollments/bulk-a").await.body;
    let mut with_etag = cur.clone();
    with_etag["deviceId"] = json!("renamed");
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "update", "enrollments": [with_etag, tpm_enrollment("bulk-e")]})),
            &[],
        )
        .await;
    assert_eq!(r.body, json!({"errors": [], "isSuccessful": true}));
    assert_eq!(
        dps.get("/enrollments/bulk-a").await.body["deviceId"],
        "renamed"
    );
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "updateIfMatchETag", "enrollments": [cur]})),
            &[],
        )
        .await;
    assert_eq!(
        r.body["errors"][0]["errorCode"].as_u64().unwrap() / 1000,
        412,
        "{}",
        r.body
    );

    // delete: missing → 404201 per item, others deleted.
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "delete", "enrollments": [
        {"registrationId": "bulk-b"}, {"registrationId": "nope"}]})),
            &[],
        )
        .await;
    assert_eq!(
        r.body["errors"],
        json!([{"registrationId": "nope", "errorCode": 404201, "errorStatus": "Enrollment not found."}])
    );
    assert_eq!(
        dps.get("/enrollments/bulk-b").await.status,
        StatusCode::NOT_FOUND
    );

    // Exactly-once bookkeeping: each id created once, whatever was retried.
    let stats = emu.stats();
    for id in ["bulk-a", "bulk-b", "bulk-c", "bulk-e"] {
        assert_eq!(stats.creates.get(id), Some(&1), "{id}");
    }
    assert!(!stats.creates.contains_key("bulk-d"));
    // The admin endpoint serves the same numbers.
    let admin: Value = reqwest::get(format!("{}/_emulator/stats", emu.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(admin["creates"]["bulk-a"], 1);
    assert_eq!(
        admin["byOperation"]["IndividualEnrollment_RunBulkOperation"],
        stats.by_operation["IndividualEnrollment_RunBulkOperation"]
    );
}

#[tokio::test]
async fn query_pages_through_three_pages() {
    let emu = harness::start().await;
    let dps = Dps::new(&emu);
    for chunk in 0..3 {
        let items: Vec<Value> = (0..10)
            .map(|i| chunk * 10 + i)
            .filter(|n| *n < 25)
            .map(|n| tpm_enrollment(&format!("page-{n:02}")))
            .collect();
        let r = dps
            .post(
                "/enrollments",
                Some(&json!({"mode": "create", "enrollments": items})),
                &[],
            )
            .await;
        assert_eq!(r.body["isSuccessful"], true);
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut h = vec![("x-ms-max-item-count", "10")];
        if let Some(t) = &token {
            h.push(("x-ms-continuation", t.as_str()));
        }
        let r = dps
            .post(
                "/enrollments/query",
                Some(&json!({"query": "SELECT * FROM enrollments"})),
                &h,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers.get("x-ms-item-type").unwrap(), "Enrollment");
        assert_eq!(r.headers.get("x-ms-max-item-count").unwrap(), "10");
        pages += 1;
        let items = r.body.as_array().unwrap();
        assert_eq!(items.len(), if pages < 3 { 10 } else { 5 });
        seen.extend(
            items
                .iter()
                .map(|v| v["registrationId"].as_str().unwrap().to_string()),
        );
        token = r
            .headers
            .get("x-ms-continuation")
            .map(|v| v.to_str().unwrap().to_string());
        if token.is_none() {
            break;
        }
        assert!(pages < 3, "too many pages");
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|n| format!("page-{n:02}")).collect();
    assert_eq!(seen, expected, "every record once, in a stable order");
    // 0 means the default page size (100): one page.
    let r = dps
        .post(
            "/enrollments/query",
            Some(&json!({"query": "*"})),
            &[("x-ms-max-item-count", "0")],
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 25);
    assert!(r.headers.get("x-ms-continuation").is_none());
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after_then_recovers() {
    // 30 per minute: a token every 2 s, bursts of 3.
    let emu = harness::start_with(EmulatorOptions {
        ops_per_minute: Some(30),
        ..Default::default()
    })
    .await;
    let dps = Dps::new(&emu);
    for _ in 0..3 {
        assert_eq!(
            dps.get("/enrollments/t").await.status,
            StatusCode::NOT_FOUND
        );
    }
    // A bulk request is one operation too; this one is over the burst.
    let bulk = json!({"mode": "create", "enrollments": [tpm_enrollment("t")]});
    let r = dps.post("/enrollments", Some(&bulk), &[]).await;
    assert_dps_error(&r, 429, 429001);
    let secs: u64 = r
        .headers
        .get("retry-after")
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((1..=2).contains(&secs), "next token within 2 s: {secs}");
    assert_eq!(emu.stats().throttled, 1);
    assert!(emu.stats().creates.is_empty(), "a 429 changes nothing");
    // Waiting out Retry-After is enough: the same request then succeeds.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let r = dps.post("/enrollments", Some(&bulk), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["isSuccessful"], true);
    assert_eq!(emu.stats().creates.get("t"), Some(&1));
    assert_dps_error(&dps.get("/enrollments/t").await, 429, 429001);

    // Raise the limit through the admin endpoint: the bucket starts full (6 at 60/min).
    let r = reqwest::Client::new()
        .put(format!("{}/_emulator/ops-per-minute", emu.base_url()))
        .body("60")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..6 {
        assert_eq!(dps.get("/enrollments/t").await.status, StatusCode::OK);
    }
    assert_dps_error(&dps.get("/enrollments/t").await, 429, 429001);
    emu.set_ops_per_minute(Some(0));
    let r = dps.get("/enrollments/t").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.get("retry-after").is_some());
    emu.set_ops_per_minute(None);
    assert_eq!(dps.get("/enrollments/t").await.status, StatusCode::OK);
    assert_eq!(emu.stats().throttled, 4);
}

#[tokio::test]
async fn faults_reset_connections_and_answer_errors() {
    let emu = harness::start_with(EmulatorOptions {
        faults: Some("reset-rate=1".into()),
        ..Default::default()
    })
    .await;
    let dps = Dps::new(&emu);
    let url = format!("{}/enrollments/f?api-version=2021-10-01", emu.base_url());
    let err = dps
        .http
        .get(&url)
        .header("Authorization", &dps.token)
        .send()
        .await;
    assert!(
        err.is_err(),
        "a reset connection gives no response: {err:?}"
    );

    emu.set_faults("error-rate=1,status=500").unwrap();
    let r = dps.get("/enrollments/f").await;
    assert_dps_error(&r, 500, 500001);

    // Through the admin endpoint: latency only.
    let admin = reqwest::Client::new();
    let r = admin
        .put(format!("{}/_emulator/faults", emu.base_url()))
        .body("latency=150ms")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t = Instant::now();
    assert_eq!(
        dps.get("/enrollments/f").await.status,
        StatusCode::NOT_FOUND
    );
    assert!(t.elapsed() >= Duration::from_millis(150));

    // A down window starting now drops everything; clearing the spec ends it.
    emu.set_faults("down-for=60s").unwrap();
    assert!(dps
        .http
        .get(&url)
        .header("Authorization", &dps.token)
        .send()
        .await
        .is_err());
    let r = admin
        .put(format!("{}/_emulator/faults", emu.base_url()))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        dps.get("/enrollments/f").await.status,
        StatusCode::NOT_FOUND
    );
    // A bad spec is refused, naming the key.
    let r = admin
        .put(format!("{}/_emulator/faults", emu.base_url()))
        .body("explode=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("explode"));
    assert!(emu.set_faults("error-rate=7").is_err());
}

#[tokio::test]
async fn state_file_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("emulator.db");
    let key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    let opts = EmulatorOptions {
        state: Some(state.clone()),
        key: Some(key.clone()),
        ..Default::default()
    };
    let emu = harness::start_with(opts.clone()).await;
    let dps = Dps::new(&emu);
    let created = dps
        .put("/enrollments/Keep-Me", &tpm_enrollment("Keep-Me"), &[])
        .await
        .body;
    let r = dps
        .post(
            "/enrollments",
            Some(&json!({"mode": "create", "enrollments": [tpm_enrollment("bulk-kept")]})),
            &[],
        )
        .await;
    assert_eq!(r.body["isSuccessful"], true);
    dps.put("/enrollments/gone", &tpm_enrollment("gone"), &[])
        .await;
    assert_eq!(
        dps.delete("/enrollments/gone", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    emu.shutdown().await;

    let emu2 = harness::start_with(opts).await;
    assert!(emu2
        .connection_string()
        .ends_with(&format!("SharedAccessKey={key}")));
    let dps2 = Dps::new(&emu2);
    let got = dps2.get("/enrollments/keep-me").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["registrationId"], "Keep-Me");
    assert_eq!(got.body["etag"], created["etag"]);
    assert_eq!(
        got.body["createdDateTimeUtc"],
        created["createdDateTimeUtc"]
    );
    assert_eq!(
        dps2.get("/enrollments/bulk-kept").await.status,
        StatusCode::OK
    );
    assert_eq!(
        dps2.get("/enrollments/gone").await.status,
        StatusCode::NOT_FOUND
    );
    // Still an existing record after the restart.
    assert_dps_error(
        &dps2
            .put("/enrollments/keep-me", &tpm_enrollment("keep-me"), &[])
            .await,
        409,
        409201,
    );
}

#[tokio::test]
async fn state_file_takes_hundreds_of_writes_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let emu = harness::start_with(EmulatorOptions {
        state: Some(dir.path().join("s.db")),
        ..Default::default()
    })
    .await;
    let dps = Dps::new(&emu);
    let t = Instant::now();
    for i in 0..200 {
        let id = format!("w-{i}");
        assert_eq!(
            dps.put(&format!("/enrollments/{id}"), &tpm_enrollment(&id), &[])
                .await
                .status,
            StatusCode::OK
        );
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "200 persisted writes took {took:?}"
    );
}

#[test]
fn the_binary_prints_its_connection_string_first_and_exits_0_on_sigterm() {
    let proc = harness::EmulatorProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--policy-name",
        "line-owner",
    ]);
    let p = parse_connection_string(&proc.connection_string);
    assert!(
        p.host_name.starts_with("127.0.0.1:"),
        "{}",
        proc.connection_string
    );
    assert_eq!(p.policy, "line-owner");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&p.key)
            .unwrap()
            .len(),
        32
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let token = sas_token(&p.host_name, &p.policy, &p.key);
        let r = reqwest::Client::new()
            .put(format!(
                "{}/enrollments/proc-1?api-version=2021-10-01",
                proc.base_url
            ))
            .header("Authorization", token)
            .json(&tpm_enrollment("proc-1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    });
    assert_eq!(proc.terminate(), Some(0));
}

#[test]
fn the_binary_refuses_a_bad_fault_spec() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dps-emulator"))
        .args(["--faults", "error-rate=nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error-rate"));
}

#[test]
fn the_vendored_spec_matches_its_provenance_note() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spec");
    let spec = std::fs::read(dir.join("dps-service-2021-10-01.json")).unwrap();
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&spec));
    assert!(
        readme.contains(&format!("sha256: `{sha}`")),
        "README names sha256 {sha}"
    );
    assert!(readme.contains("Azure/azure-rest-api-specs"));
    // The emulator validates against exactly this file.
    assert_eq!(
        dps_station::emulator::schema::SPEC_JSON.as_bytes(),
        spec.as_slice()
    );
    let v: Value = serde_json::from_slice(&spec).unwrap();
    assert_eq!(v["info"]["version"], "2021-10-01");
}
