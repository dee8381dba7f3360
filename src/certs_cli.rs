//! `mqtls certs`: the command-line side of [`mqtls::certs`] (and, for `list`, of [`mqtls::inventory`]):
//! arguments, what is printed, exit codes.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use mqtls::certs::{self, CertsError, KeyType};
use mqtls::inventory::{self, IdentityRow};
use mqtls::Config;

/// `mqtls certs list`: some identity needs attention (expired, expiring soon, readable key, invalid).
const EXIT_ATTENTION: u8 = 3;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create a private CA for a lab or a site (ca.pem, and ca.key with mode 0600).
    ///
    /// The CA may sign device certificates only (basicConstraints CA, path length 0; keyCertSign and
    /// cRLSign). Give ca.pem to the broker as the CA for client certificates (Mosquitto: `cafile`), keep
    /// ca.key away from the gateway if you can, and issue devices with `mqtls certs issue --ca DIR`.
    /// An existing CA is never replaced.
    ///
    /// Example: mqtls certs init-ca --out /root/mqtls-ca --name "Plant 3 devices"
    #[command(name = "init-ca")]
    InitCa(InitCaArgs),
    /// Issue a device's key and certificate, signed by a CA made with `init-ca`.
    ///
    /// Writes OUT/NAME/key.pem (mode 0600) and OUT/NAME/cert.pem (CN = NAME, clientAuth, digitalSignature,
    /// random serial), the layout that `[device_dir] path = "OUT"` in mqtls.toml reads: a running mqtls
    /// notices the new files on its own (or at `systemctl reload mqtls`) and serves the device, with no
    /// config edit. The device is matched by client id
    /// NAME unless --client-id sets another one in OUT/NAME/device.toml (add `source` there too).
    /// An existing identity is replaced only with --force (rotation: new key, new certificate; the key is
    /// moved into place before the certificate).
    ///
    /// The files belong to whoever runs the command. For mqtls under systemd, which runs as the user
    /// mqtls and reads only keys that user owns, run it as root with --owner mqtls.
    ///
    /// Example: mqtls certs issue --ca /root/mqtls-ca --out /etc/mqtls/devices.d --owner mqtls boiler-7
    Issue(IssueArgs),
    /// Write a device key and a certificate signing request for a CA that someone else runs.
    ///
    /// Writes OUT/NAME/key.pem (mode 0600) and OUT/NAME/csr.pem (CN = NAME, asking for clientAuth). Send
    /// csr.pem to the CA (AWS IoT Core, a corporate PKI); save the signed certificate (PEM, leaf first,
    /// then any intermediates) as OUT/NAME/cert.pem and the device is complete. Until then the directory
    /// is pending: mqtls skips it with a warning.
    ///
    /// The files belong to whoever runs the command. For mqtls under systemd, which runs as the user
    /// mqtls and reads only keys that user owns, run it as root with --owner mqtls.
    ///
    /// Example: mqtls certs csr --out /etc/mqtls/devices.d --owner mqtls boiler-7
    Csr(CsrArgs),
    /// Show every device identity: subject, issuer, serial, expiry, and what needs attention.
    ///
    /// Reads the identities a configuration names (--config, default /etc/mqtls/mqtls.toml) and/or every
    /// entry of a device directory (--dir). Flags: EXPIRED, EXPIRES SOON (within --expires-within days),
    /// KEY READABLE BY OTHERS (even where upstream.allow_readable_keys allows it), PENDING (a key and a
    /// CSR, no certificate yet), INVALID (a file that cannot be read or parsed).
    ///
    /// Exit status: 0 when nothing needs attention (PENDING alone does not count), 3 when some identity is
    /// flagged EXPIRED, EXPIRES SOON, KEY READABLE BY OTHERS or INVALID, 1 when the configuration or
    /// directory cannot be read, 2 for a usage error.
    ///
    /// Example: mqtls certs list --dir /etc/mqtls/devices.d --expires-within 60
    List(ListArgs),
}

#[derive(Args)]
pub struct InitCaArgs {
    /// Directory for ca.pem and ca.key (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The CA's Common Name.
    #[arg(long, value_name = "NAME", default_value = certs::DEFAULT_CA_NAME)]
    name: String,
    /// Validity in days.
    #[arg(long, value_name = "N", default_value_t = certs::DEFAULT_CA_DAYS)]
    days: u32,
    /// The CA's key type.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256", value_parser = key_type_parser())]
    key_type: KeyType,
}

#[derive(Args)]
pub struct IssueArgs {
    /// The device's name: its directory under --out and its certificate's Common Name (the broker sees
    /// it as the device's identity, e.g. Mosquitto's username with use_identity_as_username).
    #[arg(value_name = "NAME")]
    name: String,
    /// The CA directory made by `mqtls certs init-ca` (ca.pem, ca.key).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The device directory (`[device_dir] path` in mqtls.toml).
    #[arg(long, value_name = "DIR", default_value = "./devices")]
    out: PathBuf,
    /// The MQTT client id the device sends, if it is not NAME (written to device.toml).
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// Validity in days (cut to the CA's own expiry).
    #[arg(long, value_name = "N", default_value_t = certs::DEFAULT_DEVICE_DAYS)]
    days: u32,
    /// The device's key type.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256", value_parser = key_type_parser())]
    key_type: KeyType,
    /// Replace an existing identity with a new key and certificate (rotation).
    #[arg(long)]
    force: bool,
    /// Give the files written, and the device's directory if this creates it, to USER[:GROUP] (names
    /// from /etc/passwd and /etc/group, or numeric UID[:GID]; USER alone means USER's primary group),
    /// e.g. `--owner mqtls` for the systemd service. Each file gets its owner under its temporary name,
    /// before it is renamed into place, so a running mqtls never sees a key it cannot read (a chown
    /// afterwards is too late: mqtls may already have reloaded and failed on the new files). Needs
    /// root (CAP_CHOWN).
    #[arg(long, value_name = "USER[:GROUP]")]
    owner: Option<String>,
}

#[derive(Args)]
pub struct CsrArgs {
    /// The device's name: its directory under --out and the Common Name asked for.
    #[arg(value_name = "NAME")]
    name: String,
    /// The device directory (`[device_dir] path` in mqtls.toml).
    #[arg(long, value_name = "DIR", default_value = "./devices")]
    out: PathBuf,
    /// The key type of the new key.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256", value_parser = key_type_parser())]
    key_type: KeyType,
    /// Sign the CSR with the device's existing key.pem (renewal: the device keeps working until the new
    /// certificate replaces cert.pem).
    #[arg(long, conflicts_with_all = ["force", "key_type"])]
    reuse_key: bool,
    /// Replace an existing identity with a new key; its cert.pem is removed, so the device is pending
    /// until the new certificate arrives.
    #[arg(long)]
    force: bool,
    /// Give the files written, and the device's directory if this creates it, to USER[:GROUP] (names
    /// from /etc/passwd and /etc/group, or numeric UID[:GID]; USER alone means USER's primary group),
    /// e.g. `--owner mqtls` for the systemd service; a reused key keeps its owner. Each file gets its
    /// owner under its temporary name, before it is renamed into place, so a running mqtls never sees a
    /// key it cannot read (a chown afterwards is too late: mqtls may already have reloaded and failed on
    /// the new files). Needs root (CAP_CHOWN).
    #[arg(long, value_name = "USER[:GROUP]")]
    owner: Option<String>,
}

#[derive(Args)]
pub struct ListArgs {
    /// Configuration file whose identities to list (the default is used when neither --config nor --dir
    /// is given).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A device directory to list, with or without a configuration.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Flag certificates that expire within this many days.
    #[arg(long, value_name = "DAYS", default_value_t = inventory::DEFAULT_EXPIRY_WARNING_DAYS)]
    expires_within: u32,
    /// Print JSON (one object per identity) instead of a table.
    #[arg(long)]
    json: bool,
}

const DEFAULT_CONFIG: &str = "/etc/mqtls/mqtls.toml";

fn key_type_parser() -> impl TypedValueParser<Value = KeyType> {
    PossibleValuesParser::new(KeyType::ALL.map(KeyType::as_str))
        .map(|s| s.parse::<KeyType>().expect("every possible value parses"))
}

/// Runs one `mqtls certs` verb.
pub fn run(command: CertsCommand) -> ExitCode {
    let result = match command {
        CertsCommand::InitCa(a) => init_ca(a),
        CertsCommand::Issue(a) => issue(a),
        CertsCommand::Csr(a) => csr(a),
        CertsCommand::List(a) => return list(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_ca(a: InitCaArgs) -> Result<(), CertsError> {
    let created = certs::init_ca(&certs::CaRequest {
        out: a.out,
        name: a.name,
        days: a.days,
        key_type: a.key_type,
    })?;
    let s = &created.summary;
    println!(
        "created CA \"{}\" ({}), valid until {}",
        s.subject,
        a.key_type,
        inventory::rfc3339(s.not_after)
    );
    println!("  certificate  {}", created.cert.display());
    println!(
        "  key          {}  (mode 0600: keep it private, ideally off the gateway)",
        created.key.display()
    );
    println!("Give the certificate to the broker as the CA for client certificates (Mosquitto: cafile).");
    Ok(())
}

/// `--owner` resolved to ids, before anything else is done.
fn resolve_owner(spec: Option<&str>) -> Result<Option<certs::Owner>, CertsError> {
    spec.map(certs::Owner::resolve).transpose()
}

fn issue(a: IssueArgs) -> Result<(), CertsError> {
    let owner = resolve_owner(a.owner.as_deref())?;
    let issued = certs::issue(&certs::IssueRequest {
        ca_dir: a.ca,
        name: a.name.clone(),
        out: a.out.clone(),
        client_id: a.client_id,
        days: a.days,
        key_type: a.key_type,
        force: a.force,
        owner: owner.clone(),
    })?;
    let s = &issued.summary;
    let what = if issued.replaced {
        "replaced the identity of"
    } else {
        "issued"
    };
    println!("{what} device \"{}\"", a.name);
    println!(
        "  certificate  {}  ({}, serial {}, until {})",
        issued.cert.display(),
        s.subject,
        inventory::serial_hex(&s.serial),
        inventory::rfc3339(s.not_after)
    );
    println!("  key          {}  (mode 0600, {})", issued.key.display(), a.key_type);
    let settings = issued.dir.join(mqtls::config::DEVICE_DIR_SETTINGS);
    match &issued.settings {
        Some(p) => println!("  client id    set in {}", p.display()),
        None if settings.exists() => println!("  client id    as in {} (unchanged)", settings.display()),
        None => println!(
            "  client id    {} (the directory name; set another with --client-id)",
            a.name
        ),
    }
    print_owner(owner.as_ref());
    if issued.cut_to_ca_expiry {
        println!("note: the validity was cut to end with the CA's own certificate");
    }
    println!(
        "a running mqtls with `[device_dir] path` pointing at {} serves it within seconds (or at `systemctl reload mqtls`)",
        a.out.display()
    );
    Ok(())
}

fn csr(a: CsrArgs) -> Result<(), CertsError> {
    let owner = resolve_owner(a.owner.as_deref())?;
    let made = certs::csr(&certs::CsrRequest {
        name: a.name.clone(),
        out: a.out,
        key_type: a.key_type,
        reuse_key: a.reuse_key,
        force: a.force,
        owner: owner.clone(),
    })?;
    println!("certificate signing request for device \"{}\" (CN={})", a.name, a.name);
    println!("  request      {}", made.csr.display());
    match made.key_reused {
        true => println!("  key          {}  (the existing key)", made.key.display()),
        false => println!(
            "  key          {}  (new, mode 0600, {})",
            made.key.display(),
            a.key_type
        ),
    }
    print_owner(owner.as_ref());
    if made.removed_cert {
        println!("note: the old cert.pem was removed: it belonged to the replaced key");
    }
    println!(
        "Have the CA sign the request for client authentication and save the certificate (PEM, leaf first) as {}",
        made.dir.join(mqtls::config::DEVICE_DIR_CERT).display()
    );
    Ok(())
}

fn print_owner(owner: Option<&certs::Owner>) {
    if let Some(o) = owner {
        println!("  owner        {o}");
    }
}

fn list(a: ListArgs) -> ExitCode {
    let now = SystemTime::now();
    let mut rows = Vec::new();
    let config = a
        .config
        .or_else(|| a.dir.is_none().then(|| PathBuf::from(DEFAULT_CONFIG)));
    if let Some(path) = &config {
        match Config::load(path) {
            Ok(c) => rows.extend(inventory::rows_from_config(&c, now, a.expires_within)),
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("error: {e}");
                }
                eprintln!(
                    "{}: cannot list its identities ({} problem(s))",
                    path.display(),
                    errors.0.len()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(dir) = &a.dir {
        match inventory::rows_from_dir(dir, now, a.expires_within) {
            Ok(more) => append_new(&mut rows, more),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if a.json {
        print!("{}", inventory::render_json(&rows));
    } else {
        print!("{}", inventory::render_table(&rows, inventory::LIST_COLUMNS));
    }
    let flagged = rows.iter().filter(|r| r.needs_attention()).count();
    if flagged > 0 {
        eprintln!("{flagged} of {} identities need attention", rows.len());
        return ExitCode::from(EXIT_ATTENTION);
    }
    ExitCode::SUCCESS
}

/// Adds the rows of `more` whose key file is not listed yet (a `--dir` that the configuration also reads).
fn append_new(rows: &mut Vec<IdentityRow>, more: Vec<IdentityRow>) {
    let canonical = |p: &Option<PathBuf>| {
        p.as_deref()
            .map(|p| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()))
    };
    let seen: HashSet<Option<PathBuf>> = rows.iter().map(|r| canonical(&r.key)).collect();
    rows.extend(more.into_iter().filter(|r| !seen.contains(&canonical(&r.key))));
}
