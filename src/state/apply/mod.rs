//! Applying commands: [`Tailnet::apply_inner`] hands each command to the method of the
//! aggregate it changes, one file each (users, keys, registration, logins, nodes, SSH
//! checks, the cluster's replicas and keys, the policy, ACME). Every method validates
//! before it mutates, so a refused command changes nothing, and none reads a clock,
//! randomness or anything outside the state.

mod acme;
mod cluster;
mod dns;
mod keys;
mod logins;
mod nodes;
mod policy;
mod register;
mod ssh;
mod users;

use super::error::StateError;
use super::tailnet::Tailnet;
use super::types::{Change, Command, CommandOutput};

/// A command's output and the changes it made, or why it changed nothing.
pub(super) type Outcome = Result<(CommandOutput, Vec<Change>), StateError>;

impl Tailnet {
    pub(super) fn apply_inner(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::CreateUser {
                name,
                display_name,
                now,
                by_admin,
                profile,
            } => self.create_user(name, display_name, *now, *by_admin, profile),
            Command::RenameUser { old_name, new_name } => self.rename_user(old_name, new_name),
            Command::DeleteUser { name } => self.delete_user(name),
            Command::LinkUser { name, identity } => self.link_user(name, identity.as_ref()),
            Command::CreatePreAuthKey {
                user,
                prefix,
                hash,
                reusable,
                ephemeral,
                expiration,
                tags,
                now,
            } => self.create_preauth_key(
                user,
                prefix,
                hash,
                *reusable,
                *ephemeral,
                *expiration,
                tags,
                *now,
            ),
            Command::ExpirePreAuthKey { user, prefix, now } => {
                self.expire_preauth_key(user, prefix, *now)
            }
            Command::CreateApiKey {
                prefix,
                hash,
                expiration,
                now,
            } => self.create_api_key(prefix, hash, *expiration, *now),
            Command::ExpireApiKey { prefix, now } => self.expire_api_key(prefix, *now),
            Command::DeleteApiKey { prefix } => self.delete_api_key(prefix),
            Command::RegisterNode {
                machine_key,
                node_key,
                old_node_key,
                hostname,
                hostinfo,
                auth,
                expiry,
                ephemeral,
                prefixes,
                now,
            } => self.register_node(
                &register::Registration {
                    machine_key,
                    node_key,
                    old_node_key: old_node_key.as_deref(),
                    hostname,
                    hostinfo,
                    expiry: *expiry,
                    ephemeral: *ephemeral,
                    prefixes,
                    now: *now,
                },
                auth,
            ),
            Command::StartLogin { login } => self.start_login(login),
            Command::CompleteLogin { auth_id, user, now } => {
                self.complete_login_as(auth_id, user, *now)
            }
            Command::OidcLogin {
                auth_id,
                issuer,
                subject,
                name,
                display_name,
                now,
                profile,
            } => self.oidc_login(auth_id, issuer, subject, name, display_name, *now, profile),
            Command::UpdateNode {
                node_key,
                disco_key,
                endpoints,
                hostinfo,
                hostname,
                home_derp,
                now,
            } => self.update_node(
                node_key,
                disco_key.as_deref(),
                endpoints.as_deref(),
                hostinfo.as_deref(),
                hostname.as_deref(),
                *home_derp,
                *now,
            ),
            Command::SetOnline {
                node_id,
                online,
                replica,
                now,
            } => self.set_online(*node_id, *online, *replica, *now),
            Command::LogoutNode { node_key, now } => self.logout_node(node_key, *now),
            Command::DeleteNode { id } => self.delete_node(*id),
            Command::SetTags { id, tags } => self.set_tags(*id, tags),
            Command::ApproveRoutes { id, routes } => self.approve_routes(*id, routes),
            Command::RemoveIdleEphemeral { node_ids, cutoff } => {
                self.remove_idle_ephemeral(node_ids, *cutoff)
            }
            Command::ExpireNode { id, now } => self.expire_node(*id, *now),
            Command::SetNodeExpiry { id, expiry } => self.set_node_expiry(*id, *expiry),
            Command::DeletePreAuthKey { id } => self.delete_preauth_key(*id),
            Command::RejectLogin { auth_id } => self.reject_login(auth_id),
            Command::SetDns { settings, seed } => self.set_dns(settings, *seed),
            Command::RenameNode { id, new_name } => self.rename_node(*id, new_name),
            Command::ReplicaDown { replica, now } => self.replica_down(*replica, *now),
            Command::RegisterReplica { replica } => self.register_replica(replica),
            Command::ForgetReplica { id } => self.forget_replica(*id),
            Command::SetControlKey { key } => self.set_control_key(key),
            Command::Restore { tailnet } => self.restore(tailnet),
            Command::Batch { commands } => Ok(self.batch(commands)),
            Command::SetPolicy { text, now } => self.set_policy(text, *now),
            Command::StartSshCheck {
                auth_id,
                src,
                dst,
                ssh_user,
                now,
            } => self.start_ssh_check(auth_id, *src, *dst, ssh_user, *now),
            Command::DecideSshCheck {
                auth_id,
                approve,
                by: _,
                now,
            } => self.decide_ssh_check(auth_id, *approve, *now),
            Command::Acme { replica, step, now } => self.acme(*replica, step, *now),
        }
    }

    /// Each command of a batch on its own: one refused leaves the others applied.
    fn batch(&mut self, commands: &[Command]) -> (CommandOutput, Vec<Change>) {
        let mut outputs = Vec::with_capacity(commands.len());
        let mut changes = Vec::new();
        for c in commands {
            let (r, ch) = self.apply(c);
            outputs.push(r);
            changes.extend(ch);
        }
        (CommandOutput::Batch(outputs), changes)
    }
}
