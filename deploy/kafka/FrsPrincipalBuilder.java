// Binds each connection's identity to both of its credentials. Compiled by broker.sh
// (secured mode) against the broker's own jars and named by principal.builder.class.
//   SASL_SSL (client listener): the principal is the SCRAM user, and the client's
//     certificate (required) must carry that same name as its CN; a client presenting
//     another principal's certificate is refused, even with a valid password.
//   SSL (controller and internal listeners): the principal is the certificate's CN, and
//     only the certificate-only principals (-Dfrs.cert.only=broker,admin) are accepted, so
//     a service certificate alone never gets in without its password.
package frs;

import java.security.cert.Certificate;
import java.security.cert.X509Certificate;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Optional;
import java.util.Set;
import javax.naming.ldap.LdapName;
import javax.naming.ldap.Rdn;
import javax.net.ssl.SSLPeerUnverifiedException;
import javax.net.ssl.SSLSession;
import org.apache.kafka.common.errors.SaslAuthenticationException;
import org.apache.kafka.common.errors.SslAuthenticationException;
import org.apache.kafka.common.security.auth.AuthenticationContext;
import org.apache.kafka.common.security.auth.KafkaPrincipal;
import org.apache.kafka.common.security.auth.KafkaPrincipalBuilder;
import org.apache.kafka.common.security.auth.KafkaPrincipalSerde;
import org.apache.kafka.common.security.auth.SaslAuthenticationContext;
import org.apache.kafka.common.security.auth.SslAuthenticationContext;
import org.apache.kafka.common.security.authenticator.DefaultKafkaPrincipalBuilder;

public class FrsPrincipalBuilder implements KafkaPrincipalBuilder, KafkaPrincipalSerde {
    private final DefaultKafkaPrincipalBuilder serde = new DefaultKafkaPrincipalBuilder(null, null);
    private final Set<String> certOnly = new HashSet<>(
        Arrays.asList(System.getProperty("frs.cert.only", "broker,admin").split(",")));

    @Override
    public KafkaPrincipal build(AuthenticationContext context) {
        if (context instanceof SaslAuthenticationContext sasl) {
            String user = sasl.server().getAuthorizationID();
            Optional<SSLSession> session = sasl.sslSession();
            String cn = session.map(FrsPrincipalBuilder::commonName).orElse(null);
            if (user == null || !user.equals(cn) || certOnly.contains(user)) {
                throw new SaslAuthenticationException(
                    "client certificate does not belong to the authenticated user");
            }
            return new KafkaPrincipal(KafkaPrincipal.USER_TYPE, user);
        }
        if (context instanceof SslAuthenticationContext ssl) {
            String cn = commonName(ssl.session());
            if (cn == null || !certOnly.contains(cn)) {
                throw new SslAuthenticationException(
                    "this listener accepts only the broker's and the admin's certificates");
            }
            return new KafkaPrincipal(KafkaPrincipal.USER_TYPE, cn);
        }
        throw new IllegalStateException("unsupported authentication: plaintext is not allowed");
    }

    private static String commonName(SSLSession session) {
        try {
            Certificate[] chain = session.getPeerCertificates();
            if (chain.length == 0 || !(chain[0] instanceof X509Certificate leaf)) {
                return null;
            }
            for (Rdn rdn : new LdapName(leaf.getSubjectX500Principal().getName()).getRdns()) {
                if (rdn.getType().equalsIgnoreCase("CN")) {
                    return rdn.getValue().toString();
                }
            }
            return null;
        } catch (SSLPeerUnverifiedException e) {
            return null;  // no client certificate
        } catch (javax.naming.InvalidNameException e) {
            return null;
        }
    }

    @Override
    public byte[] serialize(KafkaPrincipal principal) {
        return serde.serialize(principal);
    }

    @Override
    public KafkaPrincipal deserialize(byte[] bytes) {
        return serde.deserialize(bytes);
    }
}
