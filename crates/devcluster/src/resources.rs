//! The resource registry: which kinds the server knows, at which URL paths, with which
//! subresources and printer columns. Built-in kinds are fixed; custom resources appear and
//! disappear as CustomResourceDefinitions are written. Discovery, routing, tables and storage
//! all read this one registry so that they never disagree.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::validation::CrdSchema;

/// A `additionalPrinterColumns` entry (or a built-in column).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// `integer`, `number`, `string`, `boolean` or `date`.
    pub type_: String,
    /// JSONPath into the object (`.spec.replicas`).
    pub json_path: String,
    /// Column description.
    pub description: String,
    /// 0 shows in the default output, higher only with `-o wide`.
    pub priority: i64,
}

/// One resource (kind) at one group/version.
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group, empty for the core group.
    pub group: String,
    /// Version (`v1`, `v1alpha1`).
    pub version: String,
    /// Kind (`Pod`).
    pub kind: String,
    /// Plural resource name used in paths (`pods`).
    pub plural: String,
    /// Singular name (`pod`).
    pub singular: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// `kubectl get` short names.
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Whether `/status` is a separate subresource.
    pub status_subresource: bool,
    /// Columns of the Table output for custom resources (empty: built-in printer).
    pub printer_columns: Vec<PrinterColumn>,
    /// The compiled schema of a custom resource version, when it has one.
    pub schema: Option<Arc<CrdSchema>>,
    /// The raw openAPIV3Schema, used to find list-map keys for server-side apply.
    pub raw_schema: Option<Arc<Value>>,
    /// True for kinds defined by a CRD.
    pub custom: bool,
}

impl ResourceType {
    /// `group/version`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The storage key: objects are stored once per group and resource, whatever the version.
    pub fn group_resource(&self) -> GroupResource {
        GroupResource {
            group: self.group.clone(),
            resource: self.plural.clone(),
        }
    }
}

/// A group and resource, the storage key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupResource {
    /// API group.
    pub group: String,
    /// Plural resource.
    pub resource: String,
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    all: bool,
}

#[allow(clippy::too_many_arguments)] // a table row constructor: one argument per column
const fn b(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    all: bool,
) -> Builtin {
    Builtin {
        group,
        version,
        kind,
        plural,
        namespaced,
        short,
        status,
        all,
    }
}

/// The built-in kinds: those the operator, helm and kubectl touch, plus a few neighbours that
/// charts commonly carry. All are stored generically.
const BUILTINS: &[Builtin] = &[
    b(
        "",
        "v1",
        "Namespace",
        "namespaces",
        false,
        &["ns"],
        true,
        false,
    ),
    b("", "v1", "Pod", "pods", true, &["po"], true, true),
    b("", "v1", "Service", "services", true, &["svc"], true, true),
    b(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        true,
        &["ep"],
        false,
        false,
    ),
    b(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        true,
        &["cm"],
        false,
        false,
    ),
    b("", "v1", "Secret", "secrets", true, &[], false, false),
    b(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        true,
        &["sa"],
        false,
        false,
    ),
    b("", "v1", "Event", "events", true, &["ev"], false, false),
    b("", "v1", "Node", "nodes", false, &["no"], true, false),
    b(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        true,
        &["pvc"],
        true,
        false,
    ),
    b(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        false,
        &["pv"],
        true,
        false,
    ),
    b(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        true,
        &["quota"],
        true,
        false,
    ),
    b(
        "",
        "v1",
        "LimitRange",
        "limitranges",
        true,
        &["limits"],
        false,
        false,
    ),
    b(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        true,
        &["sts"],
        true,
        true,
    ),
    b(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        true,
        &["deploy"],
        true,
        true,
    ),
    b(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        true,
        &["rs"],
        true,
        true,
    ),
    b(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        true,
        &["ds"],
        true,
        true,
    ),
    b(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        true,
        &[],
        false,
        false,
    ),
    b("batch", "v1", "Job", "jobs", true, &[], true, true),
    b(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        true,
        &["cj"],
        true,
        true,
    ),
    b(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        &["pdb"],
        true,
        false,
    ),
    b(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        true,
        &[],
        false,
        false,
    ),
    b(
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        true,
        &["ev"],
        false,
        false,
    ),
    b(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        &[],
        false,
        false,
    ),
    b(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        &["netpol"],
        false,
        false,
    ),
    b(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        true,
        &["ing"],
        true,
        false,
    ),
    b(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        true,
        &["hpa"],
        true,
        true,
    ),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        true,
        &[],
        false,
        false,
    ),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        &[],
        false,
        false,
    ),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        &[],
        false,
        false,
    ),
    b(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        &[],
        false,
        false,
    ),
    b(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        false,
        &["pc"],
        false,
        false,
    ),
    b(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        false,
        &["sc"],
        false,
        false,
    ),
    b(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        true,
        false,
    ),
];

/// The resource registry.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// (group, version, plural) → type.
    types: BTreeMap<(String, String, String), ResourceType>,
    /// CRD name → the (group, version, plural) keys it registered.
    crds: BTreeMap<String, Vec<(String, String, String)>>,
}

impl Registry {
    /// The built-in kinds.
    pub fn with_builtins() -> Self {
        let mut reg = Registry::default();
        for bi in BUILTINS {
            let rt = ResourceType {
                group: bi.group.into(),
                version: bi.version.into(),
                kind: bi.kind.into(),
                plural: bi.plural.into(),
                singular: bi.kind.to_lowercase(),
                namespaced: bi.namespaced,
                short_names: bi.short.iter().map(|s| s.to_string()).collect(),
                categories: if bi.all { vec!["all".into()] } else { vec![] },
                status_subresource: bi.status,
                printer_columns: Vec::new(),
                schema: None,
                raw_schema: None,
                custom: false,
            };
            reg.types.insert(
                (rt.group.clone(), rt.version.clone(), rt.plural.clone()),
                rt,
            );
        }
        reg
    }

    /// Look a resource up by group, version and plural.
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
    }

    /// Any version of a group's resource (storage-level operations such as GC).
    pub fn any_version(&self, gr: &GroupResource) -> Option<&ResourceType> {
        self.types
            .values()
            .find(|rt| rt.group == gr.group && rt.plural == gr.resource)
    }

    /// The type of an object's `apiVersion` + `kind`.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types
            .values()
            .find(|rt| rt.api_version() == api_version && rt.kind == kind)
    }

    /// All types, ordered by group, version, plural.
    pub fn all(&self) -> impl Iterator<Item = &ResourceType> {
        self.types.values()
    }

    /// Groups with their versions, in a stable order (core group first).
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rt in self.types.values() {
            let versions = groups.entry(rt.group.clone()).or_default();
            if !versions.contains(&rt.version) {
                versions.push(rt.version.clone());
            }
        }
        groups
    }

    /// Register (or re-register) the kinds a CRD serves.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), String> {
        let name = crd["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.unregister_crd(&name);
        let spec = &crd["spec"];
        let group = spec["group"].as_str().ok_or("spec.group is required")?;
        let names = &spec["names"];
        let plural = names["plural"]
            .as_str()
            .ok_or("spec.names.plural is required")?;
        let kind = names["kind"]
            .as_str()
            .ok_or("spec.names.kind is required")?;
        let singular = names["singular"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| kind.to_lowercase());
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        let mut keys = Vec::new();
        for version in spec["versions"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            if version["served"].as_bool() == Some(false) {
                continue;
            }
            let vname = version["name"]
                .as_str()
                .ok_or("spec.versions[].name is required")?;
            let raw = &version["schema"]["openAPIV3Schema"];
            let (schema, raw_schema) = if raw.is_object() {
                (
                    Some(Arc::new(CrdSchema::compile(raw)?)),
                    Some(Arc::new(raw.clone())),
                )
            } else {
                (None, None)
            };
            let printer_columns = version["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| PrinterColumn {
                            name: c["name"].as_str().unwrap_or_default().to_string(),
                            type_: c["type"].as_str().unwrap_or("string").to_string(),
                            json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
                            description: c["description"].as_str().unwrap_or_default().to_string(),
                            priority: c["priority"].as_i64().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let rt = ResourceType {
                group: group.to_string(),
                version: vname.to_string(),
                kind: kind.to_string(),
                plural: plural.to_string(),
                singular: singular.clone(),
                namespaced,
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                status_subresource: version["subresources"]["status"].is_object(),
                printer_columns,
                schema,
                raw_schema,
                custom: true,
            };
            let key = (group.to_string(), vname.to_string(), plural.to_string());
            self.types.insert(key.clone(), rt);
            keys.push(key);
        }
        self.crds.insert(name, keys);
        Ok(())
    }

    /// Forget the kinds of a deleted CRD.
    pub fn unregister_crd(&mut self, name: &str) {
        if let Some(keys) = self.crds.remove(name) {
            for key in keys {
                self.types.remove(&key);
            }
        }
    }

    /// Whether a resource of a group is served by a CRD.
    pub fn is_custom(&self, gr: &GroupResource) -> bool {
        self.any_version(gr).is_some_and(|rt| rt.custom)
    }
}
