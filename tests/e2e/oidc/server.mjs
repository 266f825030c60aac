// A real OAuth 2.0 authorization server for agentd-oauth's end-to-end tests.
//
// oidc-provider v9 on 127.0.0.1 (port from $PORT, 0 = random), over HTTPS as "localhost" when
// $TLS_CERT and $TLS_KEY name a PEM certificate and key (a private CA's). Prints one JSON line
// {"event":"listening","port":...,"issuer":...} on stdout when ready. Every request to
// the token endpoint is appended as one JSON line to $GRANT_LOG (grant type, client, outcome),
// so the tests can count refresh requests. Interactions (login + consent) are approved
// automatically for the account "e2e-user": the test only follows redirects.
//
// Clients (secrets come from the environment so the test owns them):
//   e2e-public  native, token_endpoint_auth_method=none (PKCE), redirect http://127.0.0.1/callback
//   e2e-basic   web, client_secret_basic, redirect https://client.example.org/callback
//   e2e-post    web, client_secret_post,  redirect https://client.example.org/callback

import Provider from 'oidc-provider';

import { approveInteraction, createServer, record, tls } from './common.mjs';

const basicSecret = process.env.BASIC_SECRET ?? 'basic-secret-please-change';
const postSecret = process.env.POST_SECRET ?? 'post-secret-please-change';
const WEB_REDIRECT = 'https://client.example.org/callback';
const NATIVE_REDIRECT = 'http://127.0.0.1/callback';

const common = {
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  scope: 'openid offline_access',
};

const configuration = {
  clients: [
    {
      ...common,
      client_id: 'e2e-public',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: [NATIVE_REDIRECT],
    },
    {
      ...common,
      client_id: 'e2e-basic',
      client_secret: basicSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      redirect_uris: [WEB_REDIRECT],
    },
    {
      ...common,
      client_id: 'e2e-post',
      client_secret: postSecret,
      token_endpoint_auth_method: 'client_secret_post',
      redirect_uris: [WEB_REDIRECT],
    },
  ],
  // every refresh returns a new refresh token and consumes the old one
  rotateRefreshToken: true,
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
  },
  interactions: {
    url(_ctx, interaction) {
      return `/interaction/${interaction.uid}`;
    },
  },
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 120,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
    Interaction: 600,
    Session: 3600,
  },
  async findAccount(_ctx, id) {
    return { accountId: id, async claims() { return { sub: id }; } };
  },
  cookies: { keys: ['e2e-cookie-key-not-secret'] },
};

const server = createServer();
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = tls ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration);

  // log every token-endpoint request with its outcome
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.method === 'POST' && (ctx.path === '/token' || ctx.path === '/token/revocation')) {
      const params = ctx.oidc?.params ?? {};
      const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
      record({
        event: ctx.path === '/token' ? 'token' : 'revocation',
        grant_type: params.grant_type ?? null,
        client_id: ctx.oidc?.client?.clientId ?? null,
        status: ctx.status,
        error: body.error ?? null,
      });
    }
  });

  const callback = provider.callback();
  server.on('request', (req, res) => {
    if (req.url.startsWith('/interaction/')) {
      approveInteraction(provider, req, res);
    } else {
      callback(req, res);
    }
  });
  process.stdout.write(`${JSON.stringify({ event: 'listening', port, issuer })}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
