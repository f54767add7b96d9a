//! The SSRF guard: destinations in private, loopback, link-local, CGNAT, multicast, reserved and
//! IPv6 unique-local ranges are refused unless inside an `allow_private` CIDR (SPEC §3 `[delivery]`).
//!
//! It is applied at subscribe time and again at connect time: the lanes' connections are dialled
//! only to addresses [`Guard::resolve`] lets through (and [`GuardedResolver`] is the DNS resolver
//! of the HTTP client used with an egress proxy), so a name that resolves to a refused address
//! never gets a connection, and literal IP destinations are checked before each request.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GuardError {
    #[error(
        "destination address {0} is private, loopback or reserved and not in delivery.allow_private"
    )]
    Forbidden(IpAddr),
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
}

/// Which destination addresses are allowed.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<IpNet>,
    /// With an egress proxy the proxy resolves names, so the guard resolves and checks them
    /// itself before each request.
    proxied: bool,
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (64..128).contains(&o[1])) // CGNAT 100.64.0.0/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments 192.0.0.0/24
        || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking 198.18.0.0/15
        || o[0] >= 240 // reserved 240.0.0.0/4
}

fn v6_forbidden(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_forbidden(v4);
    }
    let seg = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x0064 && seg[1] == 0xff9b) // NAT64, may reach IPv4 private space
        || seg[0] == 0x2002 // 6to4, may embed private IPv4
        || (seg[0] == 0 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0 && seg[4] == 0 && seg[5] == 0) // IPv4-compatible
}

/// Whether an address is in a range the guard refuses by default.
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => v6_forbidden(v6),
    }
}

impl Guard {
    pub fn new(allow: Vec<IpNet>) -> Guard {
        Guard {
            allow,
            proxied: false,
        }
    }

    /// A guard for attempts sent through an egress proxy.
    pub fn proxied(mut self, proxied: bool) -> Guard {
        self.proxied = proxied;
        self
    }

    /// Checks a destination just before a request: literal addresses always (the resolver is
    /// not asked for them), names too when a proxy would resolve them instead of our resolver.
    /// Unlike [`Guard::check_url`], a name that does not resolve is refused.
    pub async fn check_before_request(&self, url: &url::Url) -> Result<(), GuardError> {
        if let Some(ip) = Guard::literal_ip(url) {
            return self.check_ip(ip);
        }
        if !self.proxied {
            return Ok(());
        }
        let Some(url::Host::Domain(name)) = url.host() else {
            return Ok(());
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs =
            tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| GuardError::Resolve {
                    host: name.to_string(),
                    message: e.to_string(),
                })?;
        for a in addrs {
            self.check_ip(a.ip())?;
        }
        Ok(())
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), GuardError> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if !is_restricted(ip) || self.allow.iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(GuardError::Forbidden(ip))
        }
    }

    /// Checks a URL's host: a literal address directly, a name by resolving it. A name that does
    /// not resolve now is let through; the resolver checks it again at connect time.
    pub async fn check_url(&self, url: &url::Url) -> Result<(), GuardError> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let port = url.port_or_known_default().unwrap_or(80);
                if let Ok(addrs) = tokio::net::lookup_host((name, port)).await {
                    for a in addrs {
                        self.check_ip(a.ip())?;
                    }
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Resolves a name with the system resolver and keeps only the allowed addresses; refused
    /// when none is left (naming a refused address, if there was one).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        let addrs =
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| GuardError::Resolve {
                    host: host.to_string(),
                    message: e.to_string(),
                })?;
        let mut refused = None;
        let allowed: Vec<SocketAddr> = addrs
            .filter(|a| match self.check_ip(a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    refused = Some(e);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(refused.unwrap_or(GuardError::Resolve {
                host: host.to_string(),
                message: "no addresses".into(),
            }));
        }
        Ok(allowed)
    }

    /// The literal IP of a URL's host, if it is one (the resolver is not asked for those).
    pub fn literal_ip(url: &url::Url) -> Option<IpAddr> {
        match url.host()? {
            url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            url::Host::Domain(_) => None,
        }
    }
}

/// The HTTP client's resolver: resolves with the system resolver and keeps only allowed addresses.
pub struct GuardedResolver {
    pub guard: Arc<Guard>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let addrs = guard
                .resolve(name.as_str(), 0)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_private_ranges_unless_allowed() {
        let g = Guard::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "ff02::1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(g.check_ip(ip).is_err(), "{bad} must be refused");
        }
        for good in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            let ip: IpAddr = good.parse().unwrap();
            assert!(g.check_ip(ip).is_ok(), "{good} must be allowed");
        }
        let g = Guard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(g.check_ip("127.0.0.2".parse().unwrap()).is_ok());
        assert!(g.check_ip("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(g.check_ip("10.0.0.1".parse().unwrap()).is_err());
    }
}
