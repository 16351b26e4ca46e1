// A real OpenID provider for the console's single sign-on tests: the oidc-provider
// package (OpenID Certified), on 127.0.0.1, with its development sign-in pages (any
// password), one confidential client (the proxy), PKCE required, and test users whose
// groups come from a JSON file the test writes (and may rewrite between sign-ins, or
// before a refresh token is used: bedrock-proxy login's are, every few seconds).
//
//   node oidc_provider.mjs <port> <client-secret> <redirect-uri> <jwks.json> <users.json>
//
// Prints one JSON line, {"issuer": ...}, once it listens.
import fs from 'node:fs';
import Provider from 'oidc-provider';

const [port, clientSecret, redirectUri, jwksFile, usersFile] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const users = () => JSON.parse(fs.readFileSync(usersFile, 'utf8'));

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'bedrock-proxy',
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: JSON.parse(fs.readFileSync(jwksFile, 'utf8')),
  async findAccount(ctx, id) {
    const all = users();
    if (!(id in all)) return undefined; // removed: its refresh tokens are refused
    const user = all[id];
    return {
      accountId: id,
      async claims() {
        const claims = { sub: id, email: user.email || `${id}@example.com` };
        if (user.groups) claims.groups = user.groups;
        return claims;
      },
    };
  },
  claims: { openid: ['sub'], email: ['email'], groups: ['groups'] },
  scopes: ['openid', 'email', 'groups', 'offline_access'],
  // The ID token carries the requested claims itself (the proxy reads no userinfo).
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['bedrock-proxy-test-only'] },
  ttl: {
    AuthorizationCode: 60, IdToken: 300, Interaction: 300, Session: 600, Grant: 86400,
    RefreshToken: 86400,
  },
});
provider.proxy = false;
provider.listen(Number(port), '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ issuer }) + '\n');
});
