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
import { appendFileSync, readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';

import Provider from 'oidc-provider';

const grantLog = process.env.GRANT_LOG;
const basicSecret = process.env.BASIC_SECRET ?? 'basic-secret-please-change';
const postSecret = process.env.POST_SECRET ?? 'post-secret-please-change';
const WEB_REDIRECT = 'https://client.example.org/callback';
const NATIVE_REDIRECT = 'http://127.0.0.1/callback';

function record(entry) {
  if (grantLog) appendFileSync(grantLog, `${JSON.stringify({ at: Date.now(), ...entry })}\n`);
}

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

const tls = process.env.TLS_CERT && process.env.TLS_KEY;
const server = tls
  ? createHttpsServer({ cert: readFileSync(process.env.TLS_CERT), key: readFileSync(process.env.TLS_KEY) })
  : createHttpServer();
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

  async function interaction(req, res) {
    try {
      const details = await provider.interactionDetails(req, res);
      const { prompt, params } = details;
      let result;
      if (prompt.name === 'login') {
        result = { login: { accountId: 'e2e-user' } };
      } else if (prompt.name === 'consent') {
        let grant = details.grantId
          ? await provider.Grant.find(details.grantId)
          : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
        if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
        if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
        if (prompt.details.missingResourceScopes) {
          for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes)) {
            grant.addResourceScope(indicator, scopes.join(' '));
          }
        }
        result = { consent: { grantId: await grant.save() } };
      } else {
        result = { error: 'access_denied', error_description: `unexpected prompt ${prompt.name}` };
      }
      await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
    } catch (err) {
      res.statusCode = 500;
      res.end(String(err));
    }
  }

  const callback = provider.callback();
  server.on('request', (req, res) => {
    if (req.url.startsWith('/interaction/')) {
      interaction(req, res);
    } else {
      callback(req, res);
    }
  });
  process.stdout.write(`${JSON.stringify({ event: 'listening', port, issuer })}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
