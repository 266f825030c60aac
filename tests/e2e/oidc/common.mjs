// What the end-to-end authorization servers (server.mjs, anything.mjs) share: the request
// log, the listening socket and the automatic approval of interactions.
import { appendFileSync, readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';

const grantLog = process.env.GRANT_LOG;

// One JSON line per request the tests look at, appended to $GRANT_LOG (when set).
export function record(entry) {
  if (grantLog) appendFileSync(grantLog, `${JSON.stringify({ at: Date.now(), ...entry })}\n`);
}

// HTTPS as "localhost" when $TLS_CERT and $TLS_KEY name a PEM certificate and key, else HTTP.
export const tls = Boolean(process.env.TLS_CERT && process.env.TLS_KEY);

export function createServer() {
  return tls
    ? createHttpsServer({ cert: readFileSync(process.env.TLS_CERT), key: readFileSync(process.env.TLS_KEY) })
    : createHttpServer();
}

// Login and consent, approved for the account "e2e-user": a test only follows redirects.
export async function approveInteraction(provider, req, res) {
  try {
    const details = await provider.interactionDetails(req, res);
    const { prompt, params } = details;
    let result;
    if (prompt.name === 'login') {
      result = { login: { accountId: 'e2e-user' } };
    } else if (prompt.name === 'consent') {
      const grant = details.grantId
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
