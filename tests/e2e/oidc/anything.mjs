// Authorization servers for "connect anything" (issue 13): discovery, dynamic registration,
// resource indicators and the device flow, with oidc-provider v9.
//
// One process on 127.0.0.1 ($PORT, 0 = random), over HTTPS as "localhost" when $TLS_CERT and
// $TLS_KEY are set. Several issuers share the origin, each a path ("tenant"):
//
//   /oauth       metadata only at the RFC 8414 §3.1 inserted location
//                /.well-known/oauth-authorization-server/oauth (OpenID locations: 404)
//   /oidc        metadata only at the OpenID Connect appended location
//                /oidc/.well-known/openid-configuration (the RFC 8414 one: 404)
//   /liar        /.well-known/oauth-authorization-server/liar answers the /oauth document:
//                its issuer is not the one it was fetched for
//   /downgrade   a document whose token endpoint is plain http
//
// /oauth and /oidc are real servers with the features `registration` (open, RFC 7591, with
// registration access tokens), `resourceIndicators` (RFC 8707: any https resource on
// localhost or 127.0.0.1 gets a JWT access token whose audience is the resource, scopes
// "mcp:tools mcp:read"), `deviceFlow` (RFC 8628, poll interval $DEVICE_INTERVAL s) and
// `revocation`. Interactions (login, consent) are approved automatically for "e2e-user";
// the device confirmation page has an "approve" and a "deny" button for a browser to click.
//
// The device flow's poll interval is enforced: a poll sooner than the current interval after
// the previous one is answered `slow_down` and the interval grows by 5 s (RFC 8628 §3.5).
// Test controls (plain JSON POSTs): /__test__/slow-down {"count": n} answers the next n
// device polls `slow_down` whatever their timing; /__test__/device-ttl {"seconds": s} gives
// device codes issued from now on that lifetime.
//
// Every request the tests look at is appended as one JSON line to $GRANT_LOG: "authorize"
// (tenant, resource, scope), "registration" (status), "device_authorization" (resource,
// status), "token" (grant type, resource, status, error), "device_poll" (gap since the
// previous poll of that device code, the interval required, outcome). Prints one JSON line
// {"event":"listening","port":...,"origin":...} when ready.
import { createHash, generateKeyPairSync } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

import { approveInteraction, createServer, record, tls } from './common.mjs';

const DEVICE_INTERVAL = Number(process.env.DEVICE_INTERVAL ?? 1);
const ACCESS_TTL = Number(process.env.ACCESS_TTL ?? 3600);
let deviceTtl = Number(process.env.DEVICE_TTL ?? 600);
let forcedSlowDowns = 0;

function short(secret) {
  return secret ? createHash('sha256').update(String(secret)).digest('hex').slice(0, 12) : null;
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'e2e-rs256' };

function htmlPage(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${title}</title>
<style>body{font-family:sans-serif;margin:2em}button{font-size:1.2em;margin:.5em}</style></head>
<body><h1>${title}</h1>${body}</body></html>`;
}

function resourceAllowed(indicator) {
  try {
    const url = new URL(indicator);
    return url.protocol === 'https:' && ['localhost', '127.0.0.1'].includes(url.hostname) && !url.hash;
  } catch {
    return false;
  }
}

function configuration(tenant) {
  return {
    jwks: { keys: [signingKey] },
    clients: [],
    rotateRefreshToken: true,
    scopes: ['openid', 'offline_access'],
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      registration: { enabled: true, initialAccessToken: false, issueRegistrationAccessToken: true },
      registrationManagement: { enabled: true, rotateRegistrationAccessToken: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf ?? undefined,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator) => {
          if (!resourceAllowed(indicator)) throw new errors.InvalidTarget();
          return {
            scope: 'mcp:tools mcp:read',
            audience: indicator,
            accessTokenTTL: ACCESS_TTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
      deviceFlow: {
        enabled: true,
        charset: 'base-20',
        mask: '****-****',
        async userCodeInputSource(ctx, form, _out, err) {
          let msg = '<p>Enter the code shown by the agent.</p>';
          if (err && err.name === 'AbortedError') msg = '<p id="denied">Access denied.</p>';
          else if (err) msg = '<p id="error">That code did not work.</p>';
          ctx.body = htmlPage('Connect a device', `${msg}${form}<button id="submit" type="submit" form="op.deviceInputForm">Continue</button>`);
        },
        async userCodeConfirmSource(ctx, form, client, _deviceInfo, userCode) {
          const name = String(client.clientName ?? client.clientId).replace(/[<>&"]/g, '');
          ctx.body = htmlPage(
            'Confirm the device',
            `<p id="client">${name}</p><p>Code <code id="code">${userCode}</code></p>${form}`
            + '<button id="approve" type="submit" form="op.deviceConfirmForm">Approve</button>'
            + '<button id="deny" type="submit" form="op.deviceConfirmForm" value="yes" name="abort">Deny</button>',
          );
        },
        async successSource(ctx) {
          ctx.body = htmlPage('Device approved', '<p id="done">You can close this page.</p>');
        },
      },
    },
    interactions: {
      url(_ctx, interaction) {
        return `/${tenant}/interaction/${interaction.uid}`;
      },
    },
    ttl: {
      AccessToken: ACCESS_TTL,
      AuthorizationCode: 120,
      DeviceCode: () => deviceTtl,
      RefreshToken: 14 * 24 * 3600,
      Grant: 14 * 24 * 3600,
      Interaction: 600,
      Session: 3600,
    },
    async findAccount(_ctx, id) {
      return { accountId: id, async claims() { return { sub: id }; } };
    },
    cookies: { keys: [`e2e-cookie-key-${tenant}`] },
  };
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

function json(res, status, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json');
  res.setHeader('Cache-Control', 'no-store');
  res.end(JSON.stringify(body));
}

const server = createServer();

server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const { port } = server.address();
  const origin = tls ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
  const tenants = {};
  for (const tenant of ['oauth', 'oidc']) {
    const provider = new Provider(`${origin}/${tenant}`, configuration(tenant));
    provider.proxy = false;
    provider.use(async (ctx, next) => {
      await next();
      const body = ctx.body && typeof ctx.body === 'object' && !Buffer.isBuffer(ctx.body) ? ctx.body : {};
      if (ctx.method === 'POST' && ctx.path === '/token') {
        const params = ctx.oidc?.params ?? {};
        record({
          event: 'token',
          tenant,
          grant_type: params.grant_type ?? null,
          resource: params.resource ?? null,
          client_id: ctx.oidc?.client?.clientId ?? null,
          status: ctx.status,
          error: body.error ?? null,
          device_code: short(params.device_code),
        });
      } else if (ctx.method === 'POST' && ctx.path === '/reg') {
        record({ event: 'registration', tenant, status: ctx.status, error: body.error ?? null, client_id: body.client_id ?? null });
      } else if (ctx.method === 'POST' && ctx.path === '/device/auth') {
        const params = ctx.oidc?.params ?? {};
        if (ctx.status === 200 && body.device_code) {
          // RFC 8628 §3.2: the interval the client must wait between polls
          body.interval = DEVICE_INTERVAL;
          deviceState.set(short(body.device_code), { last: null, interval: DEVICE_INTERVAL, forced: false });
        }
        record({ event: 'device_authorization', tenant, resource: params.resource ?? null, scope: params.scope ?? null, status: ctx.status });
      } else if (ctx.method === 'GET' && ctx.path === '/auth') {
        const query = ctx.query ?? {};
        record({ event: 'authorize', tenant, resource: query.resource ?? null, scope: query.scope ?? null, prompt: query.prompt ?? null });
      }
    });
    tenants[tenant] = { provider, callback: provider.callback() };
  }

  // device code (hashed) -> { last poll ms, current interval s }
  const deviceState = new Map();

  function slowDown(res, key, state, gap, forced) {
    state.interval += 5;
    state.last = Date.now();
    record({ event: 'device_poll', device_code: key, gap_ms: gap, interval: state.interval - 5, outcome: 'slow_down', forced });
    json(res, 400, { error: 'slow_down', error_description: 'poll less often' });
  }

  async function devicePoll(req, res, tenant, body) {
    const params = new URLSearchParams(body.toString());
    const key = short(params.get('device_code'));
    const state = deviceState.get(key);
    if (state) {
      const now = Date.now();
      const gap = state.last === null ? null : now - state.last;
      if (forcedSlowDowns > 0 && !state.forced) {
        forcedSlowDowns -= 1;
        state.forced = true;
        slowDown(res, key, state, gap, true);
        return;
      }
      if (gap !== null && gap < state.interval * 1000) {
        slowDown(res, key, state, gap, false);
        return;
      }
      state.last = now;
      res.on('finish', () => record({ event: 'device_poll', device_code: key, gap_ms: gap, interval: state.interval, outcome: res.statusCode === 200 ? 'tokens' : 'answered' }));
    }
    req.body = body;
    tenants[tenant].callback(req, res);
  }

  function mount(tenant, req, res, inner) {
    // oidc-provider derives its mount path from originalUrl minus url
    req.originalUrl = `/${tenant}${inner}`;
    req.url = inner;
    tenants[tenant].callback(req, res);
  }

  server.on('request', async (req, res) => {
    const url = new URL(req.url, origin);
    const path = url.pathname;
    const query = url.search;
    try {
      if (req.method === 'POST' && path.startsWith('/__test__/')) {
        const control = JSON.parse((await readBody(req)).toString() || '{}');
        if (path === '/__test__/slow-down') forcedSlowDowns = Number(control.count ?? 1);
        else if (path === '/__test__/device-ttl') deviceTtl = Number(control.seconds ?? 600);
        else return json(res, 404, { error: 'unknown control' });
        return json(res, 200, { ok: true });
      }
      // RFC 8414 §3.1 inserted location: only /oauth serves it (and /liar lies with it)
      if (path === '/.well-known/oauth-authorization-server/oauth') {
        return mount('oauth', req, res, `/.well-known/oauth-authorization-server${query}`);
      }
      if (path === '/.well-known/oauth-authorization-server/liar') {
        return mount('oauth', req, res, `/.well-known/oauth-authorization-server${query}`);
      }
      if (path === '/.well-known/oauth-authorization-server/downgrade') {
        return json(res, 200, {
          issuer: `${origin}/downgrade`,
          authorization_endpoint: `${origin}/downgrade/auth`,
          token_endpoint: `http://127.0.0.1:${port}/downgrade/token`,
          code_challenge_methods_supported: ['S256'],
        });
      }
      for (const tenant of ['oauth', 'oidc']) {
        const prefix = `/${tenant}`;
        if (path !== prefix && !path.startsWith(`${prefix}/`)) continue;
        const inner = path.slice(prefix.length) || '/';
        if (inner.startsWith('/interaction/')) {
          return approveInteraction(tenants[tenant].provider, req, res);
        }
        // each tenant serves exactly one metadata location
        if (inner.startsWith('/.well-known/')) {
          if (tenant === 'oauth' || inner !== '/.well-known/openid-configuration') {
            return json(res, 404, { error: 'not_found' });
          }
        }
        if (req.method === 'POST' && inner === '/token') {
          const body = await readBody(req);
          const grant = new URLSearchParams(body.toString()).get('grant_type');
          req.originalUrl = `${prefix}${inner}${query}`;
          req.url = `${inner}${query}`;
          if (grant === 'urn:ietf:params:oauth:grant-type:device_code') {
            return devicePoll(req, res, tenant, body);
          }
          req.body = body;
          return tenants[tenant].callback(req, res);
        }
        return mount(tenant, req, res, `${inner}${query}`);
      }
      return json(res, 404, { error: 'not_found' });
    } catch (err) {
      res.statusCode = 500;
      res.end(String(err));
    }
  });
  process.stdout.write(`${JSON.stringify({ event: 'listening', port, origin })}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
