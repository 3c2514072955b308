//! Typed models for every schema of the DPS service API, api-version 2021-10-01
//! (`spec/dps-service-2021-10-01.json`, `definitions`), in the wire's camelCase.
//!
//! Every object keeps the fields it does not know in `extra` (`#[serde(flatten)]`), and
//! every enum keeps values it does not know in `Other(String)`, so a record read from a
//! newer service is written back unchanged (get → modify → update never drops a field).
//! Optional fields are `Option` and are omitted when `None`; timestamps stay the service's
//! own strings (7 fractional digits) so they round-trip byte for byte.
//! This module must never validate business rules or talk to the network.
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Unknown JSON members of an object, kept for the round trip.
pub type Extra = Map<String, Value>;

/// A string enum with the spec's values plus `Other(String)` for values a newer service
/// may send. Serialized as the plain string.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this version of the model does not know; kept verbatim.
            Other(String),
        }
        impl $name {
            /// Every value the 2021-10-01 spec lists, in spec order.
            pub const KNOWN: &'static [&'static str] = &[$($wire),+];
            /// The wire string.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)+
                    $name::Other(s) => s.as_str(),
                }
            }
            /// Parse a spec value (exact, case-sensitive like the service). Unknown values
            /// become `Other`.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $($wire => $name::$variant,)+
                    other => $name::Other(other.to_string()),
                }
            }
            /// Parse a value given by a user: case-insensitive, and only the known values.
            pub fn parse_known(s: &str) -> Option<Self> {
                $(if s.eq_ignore_ascii_case($wire) { return Some($name::$variant); })+
                None
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok($name::from_wire(&s))
            }
        }
    };
}

wire_enum!(
    /// `AllocationPolicy`: how a device is assigned to an IoT hub.
    AllocationPolicy { Hashed = "hashed", GeoLatency = "geoLatency", Static = "static", Custom = "custom" }
);
wire_enum!(
    /// `AssignedDeviceSubstatus`.
    AssignedDeviceSubstatus {
        InitialAssignment = "initialAssignment",
        DeviceDataMigrated = "deviceDataMigrated",
        DeviceDataReset = "deviceDataReset",
        ReprovisionedToInitialAssignment = "reprovisionedToInitialAssignment",
    }
);
wire_enum!(
    /// `AttestationType`.
    AttestationType { None = "none", Tpm = "tpm", X509 = "x509", SymmetricKey = "symmetricKey" }
);
wire_enum!(
    /// `EnrollmentStatus` (of a device registration).
    EnrollmentStatus {
        Unassigned = "unassigned",
        Assigning = "assigning",
        Assigned = "assigned",
        Failed = "failed",
        Disabled = "disabled",
    }
);
wire_enum!(
    /// `OperationMode` of a bulk operation.
    OperationMode {
        Create = "create",
        Update = "update",
        UpdateIfMatchETag = "updateIfMatchETag",
        Delete = "delete",
    }
);
wire_enum!(
    /// `ProvisioningStatus` of an enrollment.
    ProvisioningStatus { Enabled = "enabled", Disabled = "disabled" }
);

/// `IndividualEnrollment`: one device's enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<TwinCollection>,
    pub attestation: AttestationMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl IndividualEnrollment {
    /// A minimal enrollment: id and attestation, every optional field unset.
    pub fn new(registration_id: impl Into<String>, attestation: AttestationMechanism) -> Self {
        IndividualEnrollment {
            registration_id: registration_id.into(),
            device_id: None,
            registration_state: None,
            optional_device_information: None,
            attestation,
            capabilities: None,
            iot_hub_host_name: None,
            initial_twin: None,
            etag: None,
            provisioning_status: None,
            reprovision_policy: None,
            created_date_time_utc: None,
            last_updated_date_time_utc: None,
            allocation_policy: None,
            iot_hubs: None,
            custom_allocation_definition: None,
            extra: Extra::new(),
        }
    }
}

/// `EnrollmentGroup`: an enrollment shared by every device whose certificate chains to a
/// signing certificate or CA reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    pub enrollment_group_id: String,
    pub attestation: AttestationMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl EnrollmentGroup {
    /// A minimal group: id and attestation, every optional field unset.
    pub fn new(enrollment_group_id: impl Into<String>, attestation: AttestationMechanism) -> Self {
        EnrollmentGroup {
            enrollment_group_id: enrollment_group_id.into(),
            attestation,
            capabilities: None,
            iot_hub_host_name: None,
            initial_twin: None,
            etag: None,
            provisioning_status: None,
            reprovision_policy: None,
            created_date_time_utc: None,
            last_updated_date_time_utc: None,
            allocation_policy: None,
            iot_hubs: None,
            custom_allocation_definition: None,
            extra: Extra::new(),
        }
    }
}

/// `AttestationMechanism`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    #[serde(rename = "type")]
    pub kind: AttestationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl AttestationMechanism {
    /// TPM attestation with a base64 TPM2B_PUBLIC endorsement key.
    pub fn tpm(endorsement_key_b64: impl Into<String>) -> Self {
        AttestationMechanism {
            kind: AttestationType::Tpm,
            tpm: Some(TpmAttestation {
                endorsement_key: endorsement_key_b64.into(),
                storage_root_key: None,
                extra: Extra::new(),
            }),
            x509: None,
            symmetric_key: None,
            extra: Extra::new(),
        }
    }

    /// X.509 attestation of an individual enrollment: the device certificate (base64 DER
    /// or PEM text) as `clientCertificates.primary`.
    pub fn x509_client(certificate: impl Into<String>) -> Self {
        Self::x509(X509Attestation {
            client_certificates: Some(X509Certificates::primary(certificate)),
            signing_certificates: None,
            ca_references: None,
            extra: Extra::new(),
        })
    }

    /// X.509 attestation of an enrollment group: a root or intermediate CA certificate as
    /// `signingCertificates.primary`.
    pub fn x509_signing(certificate: impl Into<String>) -> Self {
        Self::x509(X509Attestation {
            client_certificates: None,
            signing_certificates: Some(X509Certificates::primary(certificate)),
            ca_references: None,
            extra: Extra::new(),
        })
    }

    /// X.509 attestation of an enrollment group by the name of a CA registered in DPS.
    pub fn x509_ca_reference(name: impl Into<String>) -> Self {
        Self::x509(X509Attestation {
            client_certificates: None,
            signing_certificates: None,
            ca_references: Some(X509CAReferences {
                primary: Some(name.into()),
                secondary: None,
                extra: Extra::new(),
            }),
            extra: Extra::new(),
        })
    }

    fn x509(x: X509Attestation) -> Self {
        AttestationMechanism {
            kind: AttestationType::X509,
            tpm: None,
            x509: Some(x),
            symmetric_key: None,
            extra: Extra::new(),
        }
    }
}

/// `TpmAttestation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    pub endorsement_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `SymmetricKeyAttestation`. The keys are secrets: never log this value.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl std::fmt::Debug for SymmetricKeyAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymmetricKeyAttestation")
            .field(
                "primary_key",
                &self.primary_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "secondary_key",
                &self.secondary_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// `X509Attestation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CAReferences>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `X509Certificates`: primary and secondary certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl X509Certificates {
    fn primary(certificate: impl Into<String>) -> Self {
        X509Certificates {
            primary: Some(X509CertificateWithInfo {
                certificate: Some(certificate.into()),
                info: None,
                extra: Extra::new(),
            }),
            secondary: None,
            extra: Extra::new(),
        }
    }
}

/// `X509CertificateWithInfo`: the certificate text on input, its `info` on output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<X509CertificateInfo>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `X509CertificateInfo` (every field required by the spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateInfo {
    pub subject_name: String,
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
    pub issuer_name: String,
    pub not_before_utc: String,
    pub not_after_utc: String,
    pub serial_number: String,
    pub version: i32,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `X509CAReferences`: names of CA certificates registered in DPS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CAReferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `DeviceCapabilities`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    pub iot_edge: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `InitialTwin`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TwinCollection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<InitialTwinProperties>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `InitialTwinProperties`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwinProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinCollection>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `TwinCollection`: `version`, `count`, `metadata`, and any other properties (which are
/// the twin's contents, kept in `properties`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinCollection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// The collection's properties (`additionalProperties` in the spec).
    #[serde(flatten)]
    pub properties: Extra,
}

/// `Metadata` of a twin collection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_version: Option<i32>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `ReprovisionPolicy` (both fields required; the service default is `true` for both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    pub update_hub_assignment: bool,
    pub migrate_device_data: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `CustomAllocationDefinition`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    pub webhook_url: String,
    pub api_version: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `DeviceRegistrationState` (every field read-only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<EnrollmentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<AssignedDeviceSubstatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `BulkEnrollmentOperation` (request body of `POST /enrollments`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    pub enrollments: Vec<IndividualEnrollment>,
    pub mode: OperationMode,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `BulkEnrollmentGroupOperation` (request body of `POST /enrollmentGroups`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    pub enrollment_groups: Vec<EnrollmentGroup>,
    pub mode: OperationMode,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `BulkEnrollmentOperationResult`. `errors` is always written (empty when none), which
/// is also the shape of the CLI's merged report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationResult {
    pub is_successful: bool,
    #[serde(default)]
    pub errors: Vec<BulkEnrollmentOperationError>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `BulkEnrollmentOperationError`: one failed item of a bulk operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationError {
    pub registration_id: String,
    pub error_code: i32,
    pub error_status: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `BulkEnrollmentGroupOperationResult`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperationResult {
    pub is_successful: bool,
    #[serde(default)]
    pub errors: Vec<BulkEnrollmentGroupOperationError>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `BulkEnrollmentGroupOperationError`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperationError {
    pub enrollment_group_id: String,
    pub error_code: i32,
    pub error_status: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `QuerySpecification`: body of the query operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuerySpecification {
    pub query: String,
    #[serde(flatten)]
    pub extra: Extra,
}

impl QuerySpecification {
    pub fn new(query: impl Into<String>) -> Self {
        QuerySpecification {
            query: query.into(),
            extra: Extra::new(),
        }
    }
}

/// `ProvisioningServiceErrorDetails`: the body of every error response. The C# v2 client
/// also accepts `code` for `errorCode` (reference/dps-api.md §4); so do we.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningServiceErrorDetails {
    #[serde(default, alias = "code", skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_utc: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A GET response shaped like the recorded real-service TPM enrollment
    /// (reference/dps-api.md §3), plus fields a newer service might add.
    fn recorded_tpm() -> Value {
        json!({
            "registrationId": "ind_enroll_tpm_9e563d5a",
            "deviceId": "dev-1",
            "registrationState": {"registrationId": "ind_enroll_tpm_9e563d5a", "status": "unassigned"},
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AToAAQALAAMAsgAg"}},
            "capabilities": {"iotEdge": false},
            "etag": "IjAwMDAxOWVkLTAwMDAtMDgwMC0wMDAwLTY0NjgwMWYzMDAwMCI=",
            "provisioningStatus": "enabled",
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
            "createdDateTimeUtc": "2023-05-19T23:10:43.9486465Z",
            "lastUpdatedDateTimeUtc": "2023-05-19T23:10:43.9486465Z",
            "allocationPolicy": "hashed",
            "initialTwin": {"tags": {"line": "A", "nested": {"a": 1}}, "properties": {"desired": {"x": 2}}},
            "credentialPolicyName": "from-a-newer-api",
            "futureObject": {"deep": [1, 2, {"k": null}]}
        })
    }

    #[test]
    fn unknown_fields_survive_get_modify_put() {
        let wire = recorded_tpm();
        let mut e: IndividualEnrollment = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(
            e.extra.get("credentialPolicyName"),
            Some(&json!("from-a-newer-api"))
        );
        assert_eq!(
            e.initial_twin
                .as_ref()
                .unwrap()
                .tags
                .as_ref()
                .unwrap()
                .properties
                .get("line"),
            Some(&json!("A"))
        );
        // Unchanged: byte-identical JSON value.
        assert_eq!(serde_json::to_value(&e).unwrap(), wire);
        // Changed: only the changed field differs.
        e.device_id = Some("dev-2".into());
        let mut expected = wire;
        expected["deviceId"] = json!("dev-2");
        assert_eq!(serde_json::to_value(&e).unwrap(), expected);
    }

    #[test]
    fn unknown_enum_values_round_trip() {
        let wire = json!({
            "enrollmentGroupId": "g1",
            "attestation": {"type": "tpmV3", "x509": {"caReferences": {"primary": "ca1"}, "newThing": true}},
            "allocationPolicy": "nearestHub",
            "provisioningStatus": "paused"
        });
        let g: EnrollmentGroup = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(g.attestation.kind, AttestationType::Other("tpmV3".into()));
        assert_eq!(
            g.allocation_policy,
            Some(AllocationPolicy::Other("nearestHub".into()))
        );
        assert_eq!(serde_json::to_value(&g).unwrap(), wire);
    }

    #[test]
    fn optional_fields_are_omitted_and_names_are_camel_case() {
        let e = IndividualEnrollment::new("board-1", AttestationMechanism::tpm("AToA"));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"registrationId": "board-1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AToA"}}})
        );
        let op = BulkEnrollmentOperation {
            enrollments: vec![],
            mode: OperationMode::UpdateIfMatchETag,
            extra: Extra::new(),
        };
        assert_eq!(
            serde_json::to_value(&op).unwrap(),
            json!({"enrollments": [], "mode": "updateIfMatchETag"})
        );
    }

    #[test]
    fn recorded_bulk_and_error_bodies_parse() {
        let r: BulkEnrollmentOperationResult = serde_json::from_value(json!({
            "errors": [{"registrationId": "ind_enroll_tpm_9e563d5a", "errorCode": 409201,
                        "errorStatus": "Enrollment already exists."}],
            "isSuccessful": false
        }))
        .unwrap();
        assert_eq!(r.errors[0].error_code, 409201);
        let ok: BulkEnrollmentOperationResult =
            serde_json::from_value(json!({"isSuccessful": true})).unwrap();
        assert!(ok.errors.is_empty());
        let e: ProvisioningServiceErrorDetails = serde_json::from_value(json!({
            "errorCode": 404201, "trackingId": "abc", "message": "Enrollment not found",
            "timestampUtc": "2023-05-19T23:10:43.9486465Z"
        }))
        .unwrap();
        assert_eq!(e.error_code, Some(404201));
        let alias: ProvisioningServiceErrorDetails =
            serde_json::from_value(json!({"code": 401002})).unwrap();
        assert_eq!(alias.error_code, Some(401002));
    }

    #[test]
    fn symmetric_keys_are_not_in_debug_output() {
        let k = SymmetricKeyAttestation {
            primary_key: Some("c2VjcmV0".into()),
            secondary_key: None,
            extra: Extra::new(),
        };
        assert!(!format!("{k:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn user_values_parse_case_insensitively() {
        assert_eq!(
            AllocationPolicy::parse_known("GEOLATENCY"),
            Some(AllocationPolicy::GeoLatency)
        );
        assert_eq!(OperationMode::parse_known("update-if-match-etag"), None);
        assert_eq!(
            ProvisioningStatus::parse_known("Disabled"),
            Some(ProvisioningStatus::Disabled)
        );
    }

    /// Every definition of the vendored 2021-10-01 spec has a type here, and a sample with
    /// every property the spec lists lands in typed fields (nothing in `extra`) and
    /// serializes back unchanged. Every spec enum value maps to a named variant.
    #[test]
    fn every_spec_schema_is_modelled() {
        let spec: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/spec/dps-service-2021-10-01.json"
        ))
        .unwrap();
        let defs = spec["definitions"].as_object().unwrap();

        fn sample(defs: &Map<String, Value>, schema: &Value, depth: usize) -> Value {
            if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
                let name = r.rsplit('/').next().unwrap();
                return sample(defs, &defs[name], depth + 1);
            }
            if let Some(e) = schema.get("enum").and_then(Value::as_array) {
                return e[0].clone();
            }
            match schema.get("type").and_then(Value::as_str) {
                Some("string") => json!("2023-05-19T23:10:43.9486465Z"),
                Some("integer") => json!(7),
                Some("boolean") => json!(true),
                Some("array") => json!([sample(defs, &schema["items"], depth + 1)]),
                _ => {
                    let mut m = Map::new();
                    if depth < 30 {
                        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                            for (k, v) in props {
                                m.insert(k.clone(), sample(defs, v, depth + 1));
                            }
                        }
                    }
                    Value::Object(m)
                }
            }
        }

        macro_rules! object {
            ($name:literal, $ty:ty, $extra:ident) => {{
                let v = sample(defs, &defs[$name], 0);
                let t: $ty =
                    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{}: {e}", $name));
                assert!(
                    t.$extra.is_empty(),
                    "{}: untyped fields {:?}",
                    $name,
                    t.$extra
                );
                assert_eq!(serde_json::to_value(&t).unwrap(), v, "{}", $name);
                $name
            }};
        }
        macro_rules! enumeration {
            ($name:literal, $ty:ident) => {{
                let values: Vec<&str> = defs[$name]["enum"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                assert_eq!(values, $ty::KNOWN, "{}", $name);
                for v in values {
                    assert!(!matches!($ty::from_wire(v), $ty::Other(_)), "{v}");
                }
                $name
            }};
        }
        let mut covered = vec![
            enumeration!("AllocationPolicy", AllocationPolicy),
            enumeration!("AssignedDeviceSubstatus", AssignedDeviceSubstatus),
            object!("AttestationMechanism", AttestationMechanism, extra),
            enumeration!("AttestationType", AttestationType),
            object!(
                "BulkEnrollmentGroupOperation",
                BulkEnrollmentGroupOperation,
                extra
            ),
            object!(
                "BulkEnrollmentGroupOperationError",
                BulkEnrollmentGroupOperationError,
                extra
            ),
            object!(
                "BulkEnrollmentGroupOperationResult",
                BulkEnrollmentGroupOperationResult,
                extra
            ),
            object!("BulkEnrollmentOperation", BulkEnrollmentOperation, extra),
            object!(
                "BulkEnrollmentOperationError",
                BulkEnrollmentOperationError,
                extra
            ),
            object!(
                "BulkEnrollmentOperationResult",
                BulkEnrollmentOperationResult,
                extra
            ),
            object!(
                "CustomAllocationDefinition",
                CustomAllocationDefinition,
                extra
            ),
            object!("DeviceCapabilities", DeviceCapabilities, extra),
            object!("DeviceRegistrationState", DeviceRegistrationState, extra),
            object!("EnrollmentGroup", EnrollmentGroup, extra),
            enumeration!("EnrollmentStatus", EnrollmentStatus),
            object!("IndividualEnrollment", IndividualEnrollment, extra),
            object!("InitialTwin", InitialTwin, extra),
            object!("InitialTwinProperties", InitialTwinProperties, extra),
            object!("Metadata", Metadata, extra),
            enumeration!("OperationMode", OperationMode),
            object!(
                "ProvisioningServiceErrorDetails",
                ProvisioningServiceErrorDetails,
                extra
            ),
            enumeration!("ProvisioningStatus", ProvisioningStatus),
            object!("QuerySpecification", QuerySpecification, extra),
            object!("ReprovisionPolicy", ReprovisionPolicy, extra),
            object!("SymmetricKeyAttestation", SymmetricKeyAttestation, extra),
            object!("TpmAttestation", TpmAttestation, extra),
            object!("TwinCollection", TwinCollection, properties),
            object!("X509Attestation", X509Attestation, extra),
            object!("X509CAReferences", X509CAReferences, extra),
            object!("X509CertificateInfo", X509CertificateInfo, extra),
            object!("X509CertificateWithInfo", X509CertificateWithInfo, extra),
            object!("X509Certificates", X509Certificates, extra),
        ];
        covered.sort_unstable();
        let mut names: Vec<&str> = defs.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(covered, names);
    }
}
